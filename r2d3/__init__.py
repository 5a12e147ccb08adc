"""r2d3: align 3D-native diffusion models with 2D rewards (Nabla-GFlowNet / Nabla-R2D3)."""

__version__ = "0.1.0"

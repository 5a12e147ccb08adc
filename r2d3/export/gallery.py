"""A static HTML gallery of regenerated assets: one page (inline CSS and JS, no CDN) with relative paths,
so it works from a static S3 website, any web server or a copied folder.

A grid of cards, one per (prompt, seed); with several checkpoints a card holds one aligned column per
checkpoint, each after the first with its reward delta against the first (base vs aligned: same prompt,
seed and noise). Images load lazily. Every score column is named and explained in a legend and can sort
the page; prompt-following checks show as pass / fail. Each asset opens in an interactive 3D splat viewer
(gsplat.js, shipped in ``r2d3/export/vendor/gsplat`` and written next to the page as ``viewer/gsplat.js``,
imported only when a viewer opens). Browsers load modules and files only over HTTP, so the 3D view needs
the gallery served (``python -m http.server`` in its folder will do); opened as a file it says so.
``gallery.html#view=N`` opens the N-th asset's viewer directly.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any, Sequence

#: where the page expects the viewer module, relative to itself
VIEWER_PATH = "viewer/gsplat.js"

#: what the image statistics and checks mean (rewards are explained by the caller, who knows the spec)
EXPLANATIONS = {
    "saturation": "mean HSV saturation of the object's pixels (very high: colour hacking)",
    "contrast": "standard deviation of luminance over the object",
    "background_coverage": "fraction of pixels showing background (near 1: the object vanished)",
    "edge_density": "fraction of pixels on strong edges (high: noisy, speckled renders)",
    "color_ok": "the dominant rendered colour matches the prompt's colour (grammar prompts only)",
    "shape_ok": "the silhouette classifier recognises the prompt's shape (grammar prompts only)",
}
CHECKS = ("color_ok", "shape_ok")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
header{display:flex;gap:1em;align-items:center;flex-wrap:wrap;margin-bottom:.6em}
input,select,button{font-size:1em;padding:.2em .4em}
details.legend{margin-bottom:1em;font-size:.9em} details.legend dt{font-weight:600}
#cards{display:grid;gap:.8em;grid-template-columns:repeat(auto-fill,minmax(270px,1fr))}
#cards.compare{grid-template-columns:1fr}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em;min-width:0}
.card h3{margin:.1em 0 .4em;font-size:.95em;overflow-wrap:anywhere}
.cols{display:grid;gap:.8em;grid-template-columns:repeat(var(--n),minmax(0,1fr))}
.col{min-width:0}
.col .name{font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;display:block}
.col img.preview{width:100%;height:auto;border:1px solid #eee;background:#fff}
.col img.turntable{width:96px;height:96px;border:1px solid #eee}
table.scores{font-size:.85em;border-collapse:collapse;margin:.3em 0} table.scores td{padding:0 .6em 0 0}
.pos{color:#070}.neg{color:#a00}.hidden{display:none}
.pass{color:#fff;background:#2a7;border-radius:3px;padding:0 .3em}
.fail{color:#fff;background:#c33;border-radius:3px;padding:0 .3em}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.75);display:flex;align-items:center;justify-content:center}
#viewer .box{background:#fff;padding:.6em;border-radius:6px;max-width:95vw}
#viewer canvas{width:min(80vw,640px);height:min(80vw,640px);display:block;background:#fff}
"""

_JS = r"""
const cards=[...document.querySelectorAll('.card')];
const box=document.getElementById('filter'), sel=document.getElementById('sort'), cnt=document.getElementById('count');
function apply(){
  const q=box.value.toLowerCase(); let n=0;
  for(const c of cards){const ok=c.dataset.prompt.toLowerCase().includes(q); c.classList.toggle('hidden',!ok); n+=ok;}
  cnt.textContent=n+' / '+cards.length;
  const [key,dir]=sel.value.split(':');
  const val=c=>{const v=parseFloat(c.dataset[key]); return isNaN(v)?(dir==='desc'?-Infinity:Infinity):v;};
  const cmp=(a,b)=>key==='order'?(+a.dataset.order)-(+b.dataset.order):(dir==='desc'?val(b)-val(a):val(a)-val(b));
  const list=document.getElementById('cards'); for(const c of [...cards].sort(cmp)) list.appendChild(c);
}
box.addEventListener('input',apply); sel.addEventListener('change',apply); apply();
window.addEventListener('load',()=>{const im=[...document.images];
  document.body.dataset.imagesLoaded=im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length;});

const meta=JSON.parse(document.querySelector('meta[name="r2d3-gallery"]').content);
function later(f){let done=false; const go=()=>{if(!done){done=true; f();}};  // rAF, or a timer where
  requestAnimationFrame(go); setTimeout(go,50);}                             // frames are not drawn
async function openViewer(button){
  document.getElementById('viewer')?.remove();
  const shade=document.createElement('div'); shade.id='viewer';
  shade.innerHTML='<div class="box"><div><b></b> <button id="close">close</button> <small>drag to orbit, '+
    'wheel to zoom</small></div><canvas width="640" height="640"></canvas><p class="msg"></p></div>';
  shade.querySelector('b').textContent=button.dataset.title;
  document.body.appendChild(shade);
  const msg=shade.querySelector('.msg'), canvas=shade.querySelector('canvas');
  let open=true; shade.querySelector('#close').onclick=()=>{open=false; shade.remove();};
  if(location.protocol==='file:'){msg.textContent='3D viewing needs the gallery served over HTTP: run '+
    '"python -m http.server" in its folder and open gallery.html at the address it prints'; return;}
  try{
    const SPLAT=await import(meta.viewer);
    const renderer=new SPLAT.WebGLRenderer(canvas);
    renderer.backgroundColor=new SPLAT.Color32(255,255,255,255);
    const scene=new SPLAT.Scene(), camera=new SPLAT.Camera();
    const splat=await SPLAT.PLYLoader.LoadAsync(button.dataset.ply, scene);
    if(meta.frame==='y-up'){  // gsplat.js expects INRIA's y-down frame: turn y-up assets half round x
      splat.rotation=SPLAT.Quaternion.FromEuler(new SPLAT.Vector3(Math.PI,0,0)); splat.applyRotation();}
    const p=splat.data.positions; let r=0;
    for(let i=0;i<p.length;i+=3) r=Math.max(r,Math.hypot(p[i],p[i+1],p[i+2]));
    // orbit at the distance where the bounding sphere fills 80 % of the view (gsplat's focal is in pixels)
    const half=Math.atan(canvas.height/2/(camera.data.fy||1132));
    const controls=new SPLAT.OrbitControls(camera,canvas,0.5,0.3,Math.max(r,0.05)/(0.8*Math.sin(half)));
    const gl=canvas.getContext('webgl2'); let frames=0;
    const frame=()=>{ if(!open) return; controls.update(); renderer.render(scene,camera);
      if(++frames===60){  // after the first depth sorts: report what was drawn (for tests and curious users)
        const px=new Uint8Array(4*canvas.width*canvas.height);
        gl.readPixels(0,0,canvas.width,canvas.height,gl.RGBA,gl.UNSIGNED_BYTE,px);
        let lit=0,sr=0,sg=0,sb=0;
        for(let i=0;i<px.length;i+=4){ const a=px[i+3]; if(a>128){lit++; sr+=px[i]*255/a; sg+=px[i+1]*255/a; sb+=px[i+2]*255/a;} }
        document.body.dataset.viewer=JSON.stringify({drawn:lit,mean:lit?[sr/lit,sg/lit,sb/lit]:null,
          splats:splat.data.vertexCount});}
      later(frame);};
    later(frame);
  }catch(e){msg.textContent='cannot show this asset in 3D: '+e; document.body.dataset.viewer=JSON.stringify({error:String(e)});}
}
for(const b of document.querySelectorAll('button.view3d')) b.addEventListener('click',()=>openViewer(b));
const wanted=/^#view=(\d+)$/.exec(location.hash);
if(wanted){const b=document.querySelectorAll('button.view3d')[+wanted[1]]; if(b) openViewer(b);}
"""


def viewer_module() -> bytes:
    """The vendored gsplat.js module the page imports from :data:`VIEWER_PATH`."""
    return (resources.files("r2d3.export") / "vendor" / "gsplat" / "gsplat.js").read_bytes()


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _check(v: Any) -> str:
    if v is None:
        return '<span title="not a grammar prompt">–</span>'
    return '<span class="pass">pass</span>' if bool(v) else '<span class="fail">fail</span>'


def _data_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def gallery_html(rows: Sequence[dict[str, Any]], checkpoints: Sequence[str], title: str = "r2d3 gallery",
                 score_keys: Sequence[str] = ("reward",), score_help: dict[str, str] | None = None,
                 score_labels: dict[str, str] | None = None,
                 extra_keys: Sequence[str] = ("saturation", "contrast", "background_coverage", "edge_density"),
                 frame: str = "y-up") -> str:
    """The page for manifest ``rows`` (``*_path`` columns relative to the page's directory).

    ``score_keys`` are the reward columns, shown as ``score_labels`` (e.g. ``reward`` -> "reward: dnc")
    with ``score_help`` saying what each measures; ``extra_keys`` the image statistics; ``frame`` the frame
    the ``.ply`` files were written in (the viewer turns them upright)."""
    help_text = {**EXPLANATIONS, **(score_help or {})}
    labels = dict(score_labels or {})
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["prompt"], int(r["seed"])), {})[r["checkpoint"]] = r
    ref = checkpoints[0] if checkpoints else None
    compare = len(checkpoints) > 1
    numeric = [*score_keys, *extra_keys]
    sort_opts = [("order", "order", "as generated")]
    for k in numeric:
        shown = labels.get(k, k)
        sort_opts += [(_data_key(k), "desc", f"{shown} (high first)"), (_data_key(k), "asc", f"{shown} (low first)")]
    if compare:
        sort_opts += [("delta", "desc", f"reward delta vs {ref} (high first)"),
                      ("delta", "asc", f"reward delta vs {ref} (low first)")]
    cards = []
    for order, ((prompt, seed), by_ckpt) in enumerate(groups.items()):
        base = by_ckpt.get(ref) if ref else None
        data: dict[str, Any] = {"order": order, "prompt": prompt}
        cols, deltas = [], []
        for name in checkpoints:
            r = by_ckpt.get(name)
            label = f'<span class="name" title="{html.escape(name, quote=True)}">{html.escape(name)}</span>'
            if r is None:
                cols.append(f'<div class="col">{label}<p>missing</p></div>')
                continue
            for k in numeric:
                data.setdefault(_data_key(k), r.get(k))
            delta = "<tr><td>Δ reward</td><td>reference</td></tr>" if compare and name == ref else ""
            if compare and name != ref and base is not None and r.get("reward") is not None \
                    and base.get("reward") is not None:
                d = r["reward"] - base["reward"]
                deltas.append(d)
                delta = f'<tr><td>Δ reward vs {html.escape(ref)}</td><td class="{"pos" if d >= 0 else "neg"}">' \
                        f"{d:+.4g}</td></tr>"
            scores = "".join(f'<tr><td title="{html.escape(help_text.get(k, ""), quote=True)}">'
                             f"{html.escape(labels.get(k, k))}</td><td>{_fmt(r.get(k))}</td></tr>"
                             for k in numeric if k in r)
            checks = "".join(f'<tr><td title="{html.escape(help_text[k], quote=True)}">{k.replace("_ok", "")}</td>'
                             f"<td>{_check(r.get(k))}</td></tr>" for k in CHECKS if k in r)
            links = " ".join(f'<a href="{html.escape(r[k + "_path"], quote=True)}">{text}</a>'
                             for k, text in (("ply", ".ply"), ("glb", ".glb"), ("turntable", "turntable"))
                             if r.get(k + "_path"))
            view = ""
            if r.get("ply_path"):
                view = (f'<button class="view3d" data-ply="{html.escape(r["ply_path"], quote=True)}" '
                        f'data-title="{html.escape(f"{prompt} (seed {seed}, {name})", quote=True)}">view in 3D</button>')
            img = (f'<img class="preview" loading="lazy" alt="preview of {html.escape(prompt, quote=True)}" '
                   f'src="{html.escape(r["preview_path"], quote=True)}">') if r.get("preview_path") else ""
            tt = (f'<img class="turntable" loading="lazy" alt="turntable" '
                  f'src="{html.escape(r["turntable_path"], quote=True)}">') if r.get("turntable_path") else ""
            cols.append(f'<div class="col">{label}{img}<br>{tt}<table class="scores">{scores}{delta}{checks}</table>'
                        f"{view} {links}</div>")
        if deltas:
            data["delta"] = sum(deltas) / len(deltas)
        attrs = " ".join(f'data-{k}="{html.escape(str(v), quote=True)}"' for k, v in data.items() if v is not None)
        cards.append(f'<div class="card" {attrs}><h3>{html.escape(prompt)} <small>seed {seed}</small></h3>'
                     f'<div class="cols" style="--n:{max(len(checkpoints), 1)}">{"".join(cols)}</div></div>')
    options = "".join(f'<option value="{k}:{d}">{html.escape(label)}</option>' for k, d, label in sort_opts)
    legend = "".join(f"<dt>{html.escape(labels.get(k, k))}</dt><dd>{html.escape(help_text.get(k, ''))}</dd>"
                     for k in [*numeric, *CHECKS])
    if compare:
        legend += f"<dt>Δ reward</dt><dd>{html.escape(f'the reward minus {ref}’s on the same prompt, seed and noise')}</dd>"
    meta = html.escape(json.dumps({"checkpoints": list(checkpoints), "assets": len(rows), "viewer": f"./{VIEWER_PATH}",
                                   "frame": frame}), quote=True)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="r2d3-gallery" content="{meta}"><style>{_CSS}</style></head><body>'
            f"<h1>{html.escape(title)}</h1><header>"
            f'<label>filter prompts <input id="filter" type="search" placeholder="text in prompt"></label>'
            f'<label>sort <select id="sort">{options}</select></label><span id="count"></span></header>'
            f'<details class="legend"><summary>what the scores mean</summary><dl>{legend}</dl></details>'
            f'<div id="cards" class="{"compare" if compare else ""}">{"".join(cards)}</div>'
            f"<script type=\"module\">{_JS}</script></body></html>\n")


__all__ = ["EXPLANATIONS", "VIEWER_PATH", "gallery_html", "viewer_module"]

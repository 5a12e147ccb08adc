"""A static HTML gallery of regenerated assets: one self-contained file (inline CSS and JS, no CDN) with
relative image paths, so it works from a local directory, a copied folder or a static S3 website.

One card per (prompt, seed) with one column per checkpoint (preview, turntable, scores, file links);
with several checkpoints each column after the first shows its reward delta against the first (a base
vs aligned comparison: same prompt, same seed, same noise). A text box filters cards by prompt text and
a menu sorts them by any score (or by the delta).
"""

from __future__ import annotations

import html
import json
from typing import Any, Sequence

_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
header{display:flex;gap:1em;align-items:center;flex-wrap:wrap;margin-bottom:1em}
input,select{font-size:1em;padding:.2em .4em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.5em}
.card h3{margin:.1em 0 .4em;font-size:1em}
.cols{display:flex;gap:1em;flex-wrap:wrap}
.col{flex:1 1 300px}
.col img.preview{max-width:calc(100% - 90px);image-rendering:pixelated;border:1px solid #eee}
.col img.turntable{width:80px;height:80px;border:1px solid #eee;vertical-align:top}
table.scores{font-size:.85em;border-collapse:collapse}
table.scores td{padding:0 .5em 0 0}
.pos{color:#070}.neg{color:#a00}.hidden{display:none}
"""

_JS = """
const cards=[...document.querySelectorAll('.card')];
const box=document.getElementById('filter'), sel=document.getElementById('sort'), cnt=document.getElementById('count');
function apply(){
  const q=box.value.toLowerCase(); let n=0;
  for(const c of cards){const ok=c.dataset.prompt.toLowerCase().includes(q); c.classList.toggle('hidden',!ok); n+=ok;}
  cnt.textContent=n+' / '+cards.length;
  const [key,dir]=sel.value.split(':');
  const val=c=>{const v=parseFloat(c.dataset[key]); return isNaN(v)?-Infinity:v;};
  const cmp=(a,b)=>key==='order'?(+a.dataset.order)-(+b.dataset.order):(dir==='desc'?val(b)-val(a):val(a)-val(b));
  const sorted=[...cards].sort(cmp);
  const list=document.getElementById('cards'); for(const c of sorted) list.appendChild(c);
}
box.addEventListener('input',apply); sel.addEventListener('change',apply); apply();
window.addEventListener('load',()=>{const im=[...document.images];
  document.body.dataset.imagesLoaded=im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length;});
"""


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _data_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def gallery_html(rows: Sequence[dict[str, Any]], checkpoints: Sequence[str], title: str = "r2d3 gallery",
                 score_keys: Sequence[str] = ("reward",),
                 extra_keys: Sequence[str] = ("saturation", "contrast", "background_coverage", "color_ok",
                                              "shape_ok")) -> str:
    """The page for manifest ``rows`` (``*_path`` columns relative to the page's directory)."""
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["prompt"], int(r["seed"])), {})[r["checkpoint"]] = r
    ref = checkpoints[0] if checkpoints else None
    compare = len(checkpoints) > 1
    sort_opts = [("order", "order", "as generated")]
    for k in score_keys:
        sort_opts += [(_data_key(k), "desc", f"{k} (high first)"), (_data_key(k), "asc", f"{k} (low first)")]
    if compare:
        sort_opts += [("delta", "desc", f"reward delta vs {ref} (high first)"),
                      ("delta", "asc", f"reward delta vs {ref} (low first)")]
    cards = []
    for order, ((prompt, seed), by_ckpt) in enumerate(groups.items()):
        base = by_ckpt.get(ref) if ref else None
        data = {"order": order, "prompt": prompt}
        cols, deltas = [], []
        for name in checkpoints:
            r = by_ckpt.get(name)
            if r is None:
                cols.append(f'<div class="col"><b>{html.escape(name)}</b><p>missing</p></div>')
                continue
            for k in score_keys:
                data.setdefault(_data_key(k), r.get(k))
            delta = ""
            if compare and name != ref and base is not None and r.get("reward") is not None \
                    and base.get("reward") is not None:
                d = r["reward"] - base["reward"]
                deltas.append(d)
                delta = f'<tr><td>Δ reward vs {html.escape(ref)}</td><td class="{"pos" if d >= 0 else "neg"}">' \
                        f"{d:+.4g}</td></tr>"
            scores = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(r.get(k))}</td></tr>"
                             for k in [*score_keys, *extra_keys] if k in r)
            links = " ".join(f'<a href="{html.escape(r[k + "_path"])}">{label}</a>'
                             for k, label in (("ply", ".ply"), ("glb", ".glb"), ("turntable", "turntable"))
                             if r.get(k + "_path"))
            img = f'<img class="preview" alt="preview" src="{html.escape(r["preview_path"])}">' \
                if r.get("preview_path") else ""
            tt = f'<img class="turntable" alt="turntable" src="{html.escape(r["turntable_path"])}">' \
                if r.get("turntable_path") else ""
            cols.append(f'<div class="col"><b>{html.escape(name)}</b><br>{img} {tt}'
                        f'<table class="scores">{scores}{delta}</table>{links}</div>')
        if deltas:
            data["delta"] = sum(deltas) / len(deltas)
        attrs = " ".join(f'data-{k}="{html.escape(str(v), quote=True)}"' for k, v in data.items() if v is not None)
        cards.append(f'<div class="card" {attrs}><h3>{html.escape(prompt)} <small>seed {seed}</small></h3>'
                     f'<div class="cols">{"".join(cols)}</div></div>')
    options = "".join(f'<option value="{k}:{d}">{html.escape(label)}</option>' for k, d, label in sort_opts)
    meta = html.escape(json.dumps({"checkpoints": list(checkpoints), "assets": len(rows)}))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="r2d3-gallery" content="{meta}"><style>{_CSS}</style></head><body>'
            f"<h1>{html.escape(title)}</h1><header>"
            f'<label>filter prompts <input id="filter" type="search" placeholder="text in prompt"></label>'
            f'<label>sort <select id="sort">{options}</select></label><span id="count"></span></header>'
            f'<div id="cards">{"".join(cards)}</div><script>{_JS}</script></body></html>\n')


__all__ = ["gallery_html"]

"""Scores a demo checkpoint on its held-out prompts with diffusers, the checks of kiln's quality
test (crates/kiln/tests/service/demo_quality.rs) redone in Python, so that training recipes can
be compared without building kiln. kiln's test, through the service, is the one that counts.

    python tools/demo/evaluate.py [CHECKPOINT] [--cfg SCALE] [--steps N]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


def classify(img: np.ndarray, palette: dict) -> np.ndarray:
    names = list(palette)
    colors = np.array([palette[n] for n in names], np.int32)
    d = ((img[:, :, None, :].astype(np.int32) - colors[None, None]) ** 2).sum(-1)
    return np.array(names, dtype=object)[d.argmin(-1)]


def blobs(mask: np.ndarray, min_area: int) -> int:
    seen = np.zeros_like(mask)
    h, w = mask.shape
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            stack, area = [(y0, x0)], 0
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                area += 1
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
            n += area >= min_area
    return n


def check(labels: np.ndarray, case: dict, grid: dict) -> dict:
    h, w = labels.shape
    out = {}
    rows = np.minimum(np.arange(h) * 3 // h, 2)
    cols = np.minimum(np.arange(w) * 3 // w, 2)
    if case["position"]:
        col, row = grid[case["position"]]
        named = (rows[:, None] == row) & (cols[None, :] == col)
        is_color = labels == case["color"]
        counts = {(c, r): int((is_color & (rows[:, None] == r) & (cols[None, :] == c)).sum())
                  for c in range(3) for r in range(3)}
        n = counts[(col, row)]
        out["object"] = n * 10 >= named.sum() and all(v < n for k, v in counts.items() if k != (col, row))
        rest = ~named
        out["background"] = (labels[rest] == case["background"]).sum() * 10 >= rest.sum() * 6
    else:
        out["background"] = (labels == case["background"]).sum() * 10 >= labels.size * 6
    if case["count"]:
        out["count"] = blobs(labels == case["color"], 12) == case["count"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(REPO / "assets/demo-checkpoint"))
    p.add_argument("--cfg", type=float, default=None, help="true classifier-free guidance scale (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, help="a folder to keep the images in")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.checkpoint)
    kiln = json.loads((root / "model_index.json").read_text()).get("_kiln", {})
    cfg = args.cfg if args.cfg is not None else kiln.get("true_cfg_scale", 1.0)
    steps = args.steps or kiln.get("steps", 8)
    pipe = FluxPipeline.from_pretrained(str(root), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    test = json.loads((root / "heldout_prompts.json").read_text())
    tally = {}
    for i, case in enumerate(test["prompts"]):
        extra = dict(true_cfg_scale=cfg, negative_prompt="") if cfg != 1.0 else {}
        img = pipe(case["prompt"], height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=1.0,
                   max_sequence_length=32, generator=torch.Generator().manual_seed(i), **extra).images[0]
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            img.save(Path(args.save) / f"{i:03}-{case['prompt'].replace(' ', '_')}.png")
        result = check(classify(np.asarray(img), test["palette"]), case, test["grid"])
        result["all"] = all(result.values())
        for k, v in result.items():
            a, b = tally.get(k, (0, 0))
            tally[k] = (a + v, b + 1)
    print(f"cfg {cfg} steps {steps}: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in tally.items()), flush=True)


if __name__ == "__main__":
    main()

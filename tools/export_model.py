"""Export a self-contained model directory (fp32 weights, config, tokenizer) from a training
checkpoint of any ZeRO stage and precision. No DeepSpeed engine or process group needed.

    python tools/export_model.py runs/demo                      # newest checkpoint → runs/demo/model
    python tools/export_model.py runs/demo/checkpoints/step-00000200 out/model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlp.config import ConfigError
from vlp.train.checkpoint import CheckpointError, find_checkpoint


def resolve(source: Path) -> Path:
    """A checkpoint dir, a checkpoints dir (its newest), or a run dir (its newest)."""
    for candidate in (source, source / "checkpoints"):
        try:
            return find_checkpoint(str(candidate), candidate)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no training checkpoint found at {source} (give a run directory, its "
                            f"checkpoints/ directory, or one checkpoints/step-* directory)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="run dir, checkpoints dir or checkpoint dir")
    parser.add_argument("out", type=Path, nargs="?", help="model directory to write (default: RUN_DIR/model)")
    args = parser.parse_args(argv)
    try:
        ckpt = resolve(args.checkpoint)
        out = args.out or ckpt.parent.parent / "model"
        from vlp.train.export import export_model_dir
        export_model_dir(ckpt, out)
    except (FileNotFoundError, ConfigError, CheckpointError) as err:
        print(f"export_model: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

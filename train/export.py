"""Export a checkpoint to TorchScript with its input contract embedded.

``python -m train.export --checkpoint runs/oamen/best.pt --out runs/oamen/oamen.pt``

The model is traced on real preprocessed inputs (the shipped sample knees when given, else
random noise), checked against the eager model (atol 1e-4) before anything is written, and
saved with the contract as the ``contract.json`` extra file. torch.jit is deprecated in this
torch release and warns about it; TorchServe 0.12 still loads TorchScript, so we keep it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import CONTRACT_FILE, load_torchscript, model_from_checkpoint
from model.contract import InputContract
from model.decode import decode_image
from model.preprocess import preprocess

log = logging.getLogger("train.export")

ATOL = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to TorchScript with its contract embedded.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.fit")
    p.add_argument("--out", required=True, help="TorchScript file to write (.pt)")
    p.add_argument("--images", nargs="*", default=[], help="images to trace and check on (default: random inputs)")
    return p


def example_inputs(contract: InputContract, images: list[str | Path], batch: int = 4) -> torch.Tensor:
    """(B, C, S, S) inputs for tracing and checking: real images when given, else seeded noise."""
    if images:
        arrays = [preprocess(decode_image(Path(p).read_bytes()), contract) for p in images]
        return torch.from_numpy(np.stack(arrays))
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, contract.channels, contract.input_size, contract.input_size, generator=g)


def export(checkpoint: str | Path, out: str | Path, images: list[str | Path] | None = None) -> Path:
    """Trace, verify against eager, embed the contract, write; returns ``out``.

    Raises:
        RuntimeError: when the traced model's outputs differ from the eager model's.
    """
    model, contract = model_from_checkpoint(checkpoint)
    # channels_last: the depthwise and residual convolutions run 1.5-2x faster on the CPU in it
    # (docs/MODEL_CARD.md); the handler feeds the batch in the same layout.
    model = model.to(memory_format=torch.channels_last)
    x = example_inputs(contract, list(images or [])).contiguous(memory_format=torch.channels_last)
    gated = hasattr(model, "forward_with_gate")
    with torch.inference_mode():
        expected = model.forward_with_gate(x) if gated else model(x)
    if gated:  # both methods: plain logits (explanations, old callers) and logits + knee-gate score
        example = x[:1]
        traced = torch.jit.trace_module(model, {"forward": example, "forward_with_gate": example}, check_trace=False)
    else:
        traced = torch.jit.trace(model, x[:1], check_trace=False)
    with torch.inference_mode():
        got = traced.forward_with_gate(x) if gated else traced(x)
    err = (got - expected).abs().max().item()
    if not torch.allclose(got, expected, atol=ATOL, rtol=0):
        raise RuntimeError(f"exported model differs from eager by {err:.2e} (> {ATOL}); not written")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.jit.save(traced, str(tmp), _extra_files={CONTRACT_FILE: contract.to_json()})
    # Check the file as it will be served: reload and compare once more.
    reloaded, reloaded_contract = load_torchscript(tmp)
    with torch.inference_mode():
        err2 = ((reloaded.forward_with_gate(x) if gated else reloaded(x)) - expected).abs().max().item()
    if err2 > ATOL or reloaded_contract != contract:
        tmp.unlink()
        raise RuntimeError(f"reloaded export differs (max err {err2:.2e}) or lost its contract; not written")
    tmp.replace(out)
    log.info(
        "exported %s (%s v%s) to %s; max |traced - eager| = %.2e",
        checkpoint,
        contract.model_name,
        contract.model_version,
        out,
        err,
    )
    return out


def main(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return export(args.checkpoint, args.out, args.images)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

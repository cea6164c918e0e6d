"""`flowers explain`: Grad-CAM (and the attention map for L3) overlays for image files."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM / attention overlays for images with a model URI",
                       description="Writes one PNG grid per image and explanations.json. The model must be a "
                                   "checkpoint or an ensemble of checkpoints (ONNX has no gradients).")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="models:/name@alias, runs:/..., a run folder or best.pt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=run, heavy=False)


def run(args) -> int:
    from flowers.inference.explain import explain_images

    files = explain_images(args.model, args.images, args.out, args.top_k)
    for f in files:
        print(f)
    return 0

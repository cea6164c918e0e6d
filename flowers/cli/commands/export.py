"""`flowers export`: a checkpoint → portable ONNX (fp32, static INT8, dynamic INT8) + TorchScript folder."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX fp32/INT8 and TorchScript (loads without flowers)",
                       description="Static INT8 is calibrated on training images of the checkpoint's own dataset "
                                   "(override the location with --data).")
    p.add_argument("--checkpoint", required=True, help="path to best.pt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", help="dataset root for calibration images (default: the checkpoint's, else $FLOWERS_DATA)")
    p.add_argument("--calibration-size", type=int, default=256, help="number of training images for calibration")
    p.add_argument("--threshold", type=float, help="uncertainty (normalized entropy) threshold to store")
    p.add_argument("--int8-recipe", default=None,
                   help="weight quantization: u8s8_7bit_bc (default: 7-bit weights, which cannot saturate on x86 "
                        "CPUs without VNNI, with bias correction), u8s8_7bit (the same without bias correction), "
                        "u8s8 (full 8-bit weights: without VNNI exact only through ONNX Runtime's slower u8 x u8 "
                        "kernels) or u8u8 (uint8 weights; ONNX Runtime runs them far slower)")
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from flowers import config as C
    from flowers.models.checkpoint import load_checkpoint, read_manifest
    from flowers.data.bundle import build_data
    from flowers.data.transforms import Preprocessing
    from flowers.inference.export import DEFAULT_INT8_RECIPE, INT8_RECIPES, export_student
    from flowers.inference.onnx_models import describe_cpu

    recipe = args.int8_recipe or DEFAULT_INT8_RECIPE
    if recipe not in INT8_RECIPES:
        raise C.ConfigError(f"--int8-recipe: unknown recipe '{recipe}'; use one of: {', '.join(INT8_RECIPES)}")
    ckpt_path = Path(args.checkpoint)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except Exception as e:  # pickle/zip errors have no common base; the user needs one line
        raise C.ConfigError(f"cannot read {ckpt_path} as a flowers checkpoint (best.pt): {str(e).splitlines()[0]}") from None
    data_cfg = C.build(C.Config, ckpt["config"]).data
    if args.data:
        data_cfg = C.replace(C.Config(data=data_cfg), {"data.root": args.data}).data
    data = build_data(data_cfg, Preprocessing.from_dict(ckpt["preprocessing"]))
    out = export_student(ckpt_path, Path(args.out), data.eval_part("train"), args.threshold,
                         calibration_size=args.calibration_size, int8_recipe=recipe)
    manifest = read_manifest(out)
    q = manifest["quantization"]
    print(json.dumps({"out": str(out), "files": manifest["files"], "model_name": manifest["model_name"],
                      "int8_recipe": q["recipe"], "saturation_safe": q["saturation_safe"],
                      "validated_on": q["validated_on"], "cpu": describe_cpu()}, indent=2))
    return 0

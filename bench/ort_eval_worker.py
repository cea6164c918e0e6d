"""Top-1 of ONNX files on saved uint8 test images, with numpy and onnxruntime only (no flowers, no torch).

    python bench/ort_eval_worker.py IMAGES.npz [--precise] MODEL.onnx...

`bench/int8_recipes.py --emulate-cpu Haswell` runs this under `qemu-x86_64 -cpu Haswell` to
see what a CPU without VNNI computes; importing torch there would take minutes. `--precise`
sets ONNX Runtime's `session.x64quantprecision` (exact u8 x u8 kernels where u8 x s8 could
saturate), as `flowers.inference.onnx_models.load_onnx` does for an 8-bit model on a CPU without VNNI. Prints one
JSON object: path → {"preds": top-1 per image, "probs": probabilities per image}.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main(argv: list[str]) -> int:
    data = np.load(argv[0])
    precise = "--precise" in argv
    out = {}
    for path in [a for a in argv[1:] if a != "--precise"]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        if precise:
            opts.add_session_config_entry("session.x64quantprecision", "1")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        x = data["x"]
        probs = np.concatenate([sess.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])
        out[path] = {"preds": probs.argmax(1).tolist(), "probs": probs.tolist()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Ask a running container to classify a real PNG and compare with the checkpoint's own prediction.

    python container/probe.py --url http://127.0.0.1:PORT --data-dir DATA --checkpoint best.pt --out DIR

Writes DIR/probe.png (a test image of the dataset) and DIR/probe.json; exits non-zero on any mismatch.
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training.checkpoint import load_classifier  # noqa: E402
from training.data import load_cifar100  # noqa: E402
from training.files import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--index", type=int, default=0, help="which test image")
    args = p.parse_args(argv)

    image = load_cifar100(args.data_dir).test_images[args.index]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "probe.png"
    Image.fromarray(image).save(png)
    # The service sees the decoded PNG, so predict on exactly that (PNG is lossless, but prove it).
    decoded = np.array(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))
    assert np.array_equal(decoded, image), "PNG round trip changed the pixels"

    model, ckpt = load_classifier(args.checkpoint, "cpu")
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(decoded[None])).float(), dim=1)[0].numpy()
    expected = int(probs.argmax())

    with png.open("rb") as f:
        r = requests.post(f"{args.url}/classify", files={"images": ("probe.png", f, "image/png")}, timeout=60)
    if r.status_code != 200:
        sys.exit(f"/classify answered HTTP {r.status_code}: {r.text[:500]}")
    pred = r.json()["predictions"][0]
    info = requests.get(f"{args.url}/info", timeout=30).json()
    served = {k: info.get(k) for k in ("model", "backend", "device", "precision")}
    report = {"served_by": served, "expected_class_id": expected, "expected_probability": float(probs[expected]),
              "expected_class_name": ckpt["classes"][expected], "answer": pred}
    write_json(out / "probe.json", report)
    problems = []
    if pred["class_id"] != expected:
        problems.append(f"class_id {pred['class_id']} != model's {expected}")
    if pred["class_name"] != ckpt["classes"][expected]:
        problems.append(f"class_name {pred['class_name']!r} != {ckpt['classes'][expected]!r}")
    if abs(pred["probability"] - float(probs[expected])) > 1e-3:
        problems.append(f"probability {pred['probability']:.6f} != model's {probs[expected]:.6f}")
    top5 = pred["top5"]
    if len(top5) != 5 or top5[0]["class_id"] != expected:
        problems.append(f"top5 {top5} does not start with {expected}")
    for t in top5:  # every entry is the model's probability for that class (order may differ only on near-ties)
        if abs(t["probability"] - float(probs[t["class_id"]])) > 1e-3:
            problems.append(f"top5 class {t['class_id']}: {t['probability']:.6f} != model's {probs[t['class_id']]:.6f}")
    if sorted(float(probs[t["class_id"]]) for t in top5)[0] < np.sort(probs)[-5] - 1e-3:
        problems.append(f"top5 {[t['class_id'] for t in top5]} is not the model's top 5 {np.argsort(-probs)[:5].tolist()}")
    if problems:
        sys.exit("probe failed: " + "; ".join(problems))
    print(f"/classify ({served['backend']} on {served['device']}, {served['model']}) agrees with the checkpoint: "
          f"class {expected} ({ckpt['classes'][expected]}), p={probs[expected]:.4f}, top-5 probabilities within 1e-3")


if __name__ == "__main__":
    main()

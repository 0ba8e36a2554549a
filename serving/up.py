"""The main job: a model in the BentoML store (training and exporting Part 1 if there is none), then the service.

    python -m serving.up [--synthetic] [--host 127.0.0.1] [--port 3000] [--backend auto|torch|onnx|tensorrt]
    cifar100 serve ...     (the same, once the package is installed)

1. If the store (BENTOML_HOME, default ~/bentoml) has no `cifar100-classifier`: train Part 1 on CIFAR-100 in
   ./data (downloaded when reachable; --synthetic or CIFAR100_SYNTHETIC=1 generates a small offline set with
   training.synthetic instead), then `python -m export all` (ONNX, FP16 ONNX, TensorRT when possible, store).
   Relative folders (data, runs, artifacts) are under the current directory.
2. exec `python -m bentoml serve serving.service:Classifier`: the service is imported by its module name, from
   the checkout or from the installed package alike, with this Python.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

from serving import settings
from training.contract import IMAGE_SHAPE, MODEL_NAME


def parse_args(argv=None, prog="python -m serving.up"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", action="store_true", default=settings.get().synthetic,
                   help="offline smoke run: train on a small generated dataset (env CIFAR100_SYNTHETIC=1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the interface to listen on (default %(default)s: this machine only; 0.0.0.0 exposes the "
                        "service to the network: set CIFAR100_API_TOKEN then)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--backend", choices=["auto", "torch", "onnx", "tensorrt"], default=None,
                   help="sets CIFAR100_BACKEND (default: $CIFAR100_BACKEND, else auto)")
    p.add_argument("--data-dir", default="data", help="CIFAR-100 lives (or is downloaded) here")
    p.add_argument("--runs", default="runs", help="training output")
    p.add_argument("--artifacts", default="artifacts", help="export output")
    p.add_argument("--epochs", type=int, default=None, help="Part 1 epochs (default: the recipe's; 3 with --synthetic)")
    return p.parse_args(argv)


def stored_model(tag):
    """The full tag of TAG (name or name:version) in the BentoML store, or None."""
    import bentoml
    from bentoml.exceptions import NotFound
    try:
        return str(bentoml.models.get(tag).tag)
    except NotFound:
        return None


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: `{' '.join(cmd[1:])}` failed (see above)")


def prepare_data(args):
    """The data dir for training; exits with a clear message when CIFAR-100 can be neither found nor downloaded."""
    from training.data import DataError, load_cifar100

    if args.synthetic:
        from training.synthetic import write_dataset
        data_dir = Path(args.data_dir) / "synthetic"
        if not (data_dir / "cifar-100-python" / "train").exists():
            print(f"writing a synthetic CIFAR-100-format dataset to {data_dir} (offline smoke run)")
            write_dataset(data_dir, per_class=50)
        return data_dir
    try:
        load_cifar100(args.data_dir, download=True)
    except DataError as e:
        sys.exit(f"error: {e}\nCIFAR-100 could not be loaded or downloaded. For an offline smoke run use "
                 f"`make serve ARGS=--synthetic` / `python -m serving.up --synthetic` (or CIFAR100_SYNTHETIC=1), which trains on generated data.")
    return Path(args.data_dir)


def ensure_model(args):
    """A model tag in the store, training and exporting Part 1 first when there is none."""
    wanted = settings.get().model
    if wanted != f"{MODEL_NAME}:latest":  # another model or a pinned version
        if (tag := stored_model(wanted)) is None:
            sys.exit(f"error: CIFAR100_MODEL={wanted} is not in the BentoML store (`bentoml models list`)")
        return tag
    if (tag := stored_model(f"{MODEL_NAME}:latest")) is not None:
        print(f"serving {tag}, the latest {MODEL_NAME} in the BentoML store")
        return tag
    print(f"no {MODEL_NAME} in the BentoML store: training Part 1, exporting it, importing it")
    data_dir = prepare_data(args)
    runs = Path(args.runs) / "synthetic" if args.synthetic else Path(args.runs)
    checkpoint = runs / "part1" / "best.pt"
    if not checkpoint.is_file():
        epochs = args.epochs or (3 if args.synthetic else None)
        run([sys.executable, "-m", "training", "part1", "--data-dir", str(data_dir), "--out", str(runs),
             *(["--epochs", str(epochs)] if epochs else []),
             # smoke run: small batches learn the small generated set in seconds
             *(["--batch-size", "64", "--workers", "0", "--wandb", "disabled"] if args.synthetic else [])])
    run([sys.executable, "-m", "export", "all", "--checkpoint", str(checkpoint), "--out", args.artifacts,
         "--name", MODEL_NAME])
    return stored_model(f"{MODEL_NAME}:latest")


def main(argv=None, prog="python -m serving.up"):
    try:
        token = settings.get().token   # a bad setting stops us before any training
    except settings.SettingsError as e:
        sys.exit(f"error: {e}")
    args = parse_args(argv, prog)
    tag = ensure_model(args)
    env = dict(os.environ)
    if args.backend:
        env["CIFAR100_BACKEND"] = args.backend
    env.setdefault("CIFAR100_MODEL", tag)
    url = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    auth = ' -H "Authorization: Bearer $CIFAR100_API_TOKEN"' if token else ""
    if args.host in ("127.0.0.1", "localhost", "::1"):
        reach = "listening on this machine only (--host 0.0.0.0 exposes it to the network)"
    else:
        reach = f"listening on {args.host}: reachable from the network, " + (
            "callers need the token" if token else "with no token: anyone who reaches the port may call it")
    shape = ", ".join(map(str, IMAGE_SHAPE))
    print(f"\nstarting {tag} at {url} (backend {args.backend or settings.get().backend}), {reach}.\n"
          f"Once /readyz answers, try:\n"
          f"  curl -s{auth} {url}/info\n"
          f"  curl -s{auth} -F images=@some_picture.jpg {url}/classify\n"
          f"  python -c \"import numpy as np; np.save('x.npy', np.zeros((8, {shape}), np.uint8))\" && "
          f"curl -s{auth} -F images=@x.npy {url}/classify_batch\n"
          f"  the API's documentation: {url}/\n"
          f"  the web page (drop images on it): {url}/ui\n", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier",
                               "--host", args.host, "--port", str(args.port)], env)


if __name__ == "__main__":
    main()

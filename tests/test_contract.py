"""training/contract.py is the one place the contract is spelled out: the batch check, chunking, and a scan of
the code, the bentofile and the scripts for copies of it."""
import ast
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from training import contract
from training.contract import BatchError, check_batch, chunks

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for folder in ("training", "export", "serving", "loadtest", "bench", "container")
              for p in (ROOT / folder).glob("*.py") if p.name != "contract.py")
SCRIPTS = sorted([*ROOT.glob("bench/*.sh"), *ROOT.glob("container/*.sh"), ROOT / "Makefile"])
STORE_NAMES = {contract.MODEL_NAME, contract.CHECKPOINT_FILE, contract.ONNX_FILE, contract.ONNX_FP16_FILE,
               contract.ONNX_INT8_FILE, contract.ONNX_INT8_INFO_FILE, contract.ENGINE_FILE, contract.ENGINE_INFO_FILE,
               contract.INPUT, contract.OUTPUT}


@pytest.mark.parametrize("dtype, shape, status, message", [
    (np.float32, (2, 32, 32, 3), 422, "expected an array of uint8 N×32×32×3 (NHWC, RGB), got float32 (2, 32, 32, 3)"),
    (np.uint8, (2, 3, 32, 32), 422, "got uint8 (2, 3, 32, 32)"),
    (np.uint8, (32, 32, 3), 422, "got uint8 (32, 32, 3)"),
    (np.uint8, (0, 32, 32, 3), 400, "empty batch (0 images)"),
    (np.uint8, (65, 32, 32, 3), 413, "65 images exceed the limit of 64 per request (LIMIT); split the batch"),
])
def test_batch_check_says_what_is_wrong(dtype, shape, status, message):
    with pytest.raises(BatchError) as error:
        check_batch(np.dtype(dtype), shape, max_images=64, limit_name="LIMIT")
    assert error.value.status == status and message in str(error.value)
    check_batch(np.dtype(np.uint8), (64, 32, 32, 3), max_images=64)   # at the limit: fine


def test_chunks_cover_every_row_once():
    assert chunks(0, 4) == []
    assert [(s.start, s.stop) for s in chunks(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.start, s.stop) for s in chunks(8, 4)] == [(0, 4), (4, 8)]


def docstrings(tree):
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def copies_of_the_contract(path):
    """Where PATH's code (not its docstrings and comments) spells out the image shape, the number of classes,
    the store's name or its file names."""
    tree = ast.parse(path.read_text())
    skip, found = docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [f"{path.name}:{node.lineno}: {name!r}" for name in STORE_NAMES if name in node.value]
        elif isinstance(node, ast.Tuple):
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if any(values[i:i + 3] == [32, 32, 3] for i in range(len(values))):
                found.append(f"{path.name}:{node.lineno}: a (…, 32, 32, 3) shape")
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value == 100:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_spells_out_the_contract():
    assert [f for path in CODE for f in copies_of_the_contract(path)] == []


def test_the_scan_finds_a_copy(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Doc: uint8 N×32×32×3 (NHWC, RGB) in cifar100-classifier."""\n'
                      'import numpy as np\nNUM_CLASSES = 100\nx = np.zeros((8, 32, 32, 3))\n'
                      'tag = f"cifar100-classifier:{1}"\n')
    assert len(copies_of_the_contract(sample)) == 3


def test_bentofile_and_scripts_agree_with_the_contract():
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert [m.split(":")[0] for m in bentofile["models"]] == [contract.MODEL_NAME]
    assert contract.INPUT.split(" (")[0] in bentofile["description"]
    included = bentofile["include"]
    assert "training/contract.py" in included or "training/*.py" in included
    for script in SCRIPTS:
        text = script.read_text()
        assert not re.search(r"32, ?32, ?3\b", text), f"{script.name} spells out the image shape"
        assert not re.search(r"cifar100-classifier|model\.(fp16\.|int8\.)?onnx|model\.engine|checkpoint\.pt", text), \
            f"{script.name} names the model store's entry or files: take them from training/contract.py"


def test_serving_imports_nothing_from_export():
    for path in (ROOT / "serving").glob("*.py"):
        imports = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in imports if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in imports if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n == "export" or n.startswith("export.")], path.name


def test_a_broken_tensorrt_install_is_a_reason_not_a_crash(model_dir, tmp_path, monkeypatch):
    from serving.backends import load_backend
    from serving.tensorrt import unavailable_reason

    fake = tmp_path / "site" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise OSError("libnvinfer.so.11: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert unavailable_reason() == ("the tensorrt package does not load: OSError: "
                                    "libnvinfer.so.11: cannot open shared object file")
    entry = tmp_path / "entry"
    entry.mkdir()
    for f in model_dir.iterdir():
        (entry / f.name).symlink_to(f)
    (entry / contract.ENGINE_FILE).write_bytes(b"engine")
    (entry / contract.ENGINE_INFO_FILE).write_text('{"precision": "fp16", "max_batch": 256}')
    backend = load_backend("auto", entry)
    assert "does not load: OSError" in backend.auto["left_out"]["tensorrt"]

"""Sharded Hugging Face folders: model.safetensors.index.json and pytorch_model.bin.index.json folders open to the
same model as one file; our writer shards above max_shard_size with an index transformers reads; a broken index
(missing shard, tensor the index does not list or puts elsewhere, truncated file) is refused in one line naming
the file and the tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from artifacts import open_model
from common.errors import MissingFileError, UserError
from fixtures_quant import tiny_model_dir, tiny_tokenizer
from model.hf_shards import parse_size


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    tok = tiny_tokenizer(root)
    folder, model = tiny_model_dir(root, tok)
    ids = torch.tensor([tok.encode("the city of music and people", bos=True)])
    with torch.no_grad():
        logits = model(ids)
    return dict(root=root, tok=tok, folder=folder, model=model, ids=ids, logits=logits)


def logits_of(folder, ids):
    with torch.no_grad():
        return open_model(folder, "cpu", "float32")(ids)


def sharded(base, out, max_shard_size="40KB"):
    return base["model"].to_hf(out, tokenizer_path=base["tok"].path, max_shard_size=max_shard_size)


def test_parse_size_reads_sizes_as_transformers():
    assert parse_size(1000) == 1000 and parse_size("1000") == 1000
    assert parse_size("500MB") == 500 * 10**6 and parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("40KiB") == 40 * 1024
    assert parse_size("8Gb") == 10**9  # lowercase b: bits
    for bad in ("five", "5TB", "", "0"):
        with pytest.raises(UserError, match="--max_shard_size"):
            parse_size(bad)


def test_sharded_output_opens_in_transformers_and_here(base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = sharded(base, tmp_path / "out", "40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    sizes = {name: (out / name).stat().st_size for name in shards}
    # Every shard but one holding a single larger tensor stays under the limit (plus its small header).
    over = [n for n, size in sizes.items() if size > 40_000 + 4096]
    assert all(len(load_file(out / n)) == 1 for n in over)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in base["model"].state_dict().values())
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()(base["ids"]).logits
    torch.testing.assert_close(theirs, base["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_of(out, base["ids"]), base["logits"], rtol=0, atol=0)


def test_bf16_sharded_output_reads_back_as_bf16_weights(base, tmp_path):
    out = base["model"].to_hf(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="30KB")
    reread = open_model(out, "cpu", "float32")
    for name, p in base["model"].state_dict().items():
        torch.testing.assert_close(reread.state_dict()[name], p.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_bin_index_folder_opens(base, tmp_path):
    """pytorch_model.bin.index.json with two .bin shards (read with weights_only)."""
    out = tmp_path / "bin"
    shutil.copytree(base["folder"], out)
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({k: state[k] for k in part}, out / file)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}))
    torch.testing.assert_close(logits_of(out, base["ids"]), base["logits"], rtol=0, atol=0)


def test_missing_shard_is_named(base, tmp_path):
    out = sharded(base, tmp_path / "out")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingFileError, match=rf"model\.safetensors\.index\.json names shard {shard.name} "
                                               r"\(for tensor [\w.]+"):
        open_model(out, "cpu", "float32")


def test_shard_with_a_tensor_the_index_does_not_list_is_named(base, tmp_path):
    out = sharded(base, tmp_path / "out")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.norm.weight"
    shard = index["weight_map"].pop(name)
    index_file.write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"{shard} holds tensor model\.norm\.weight, but "
                                        r"model\.safetensors\.index\.json does not list it"):
        open_model(out, "cpu", "float32")
    other = next(v for v in index["weight_map"].values() if v != shard)
    index["weight_map"][name] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"model\.norm\.weight, but model\.safetensors\.index\.json puts it in "
                                        rf"{other}"):
        open_model(out, "cpu", "float32")


def test_truncated_file_is_named(base, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(base["folder"], out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors: tensor [\w.]+ lies past the end of the file"):
        open_model(out, "cpu", "float32")

"""Fine-tuning pieces without a launcher: chat templates against transformers' apply_chat_template, loss masks,
truncation, data layouts and bad input, packing, the loss normalisation; plus short single-rank runs (accumulation
equivalence, the CLI's one-line errors, export)."""
from __future__ import annotations

import dataclasses
import gzip
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from common import reflect
from common.errors import UserError
from common.tensors import IGNORE_INDEX
from finetune import templates
from finetune.config import FinetuneConfig, load_finetune_config
from finetune.data import BadRecord, DataOptions, Fields, build_sample, load_samples, to_messages
from finetune.loader import InstructionLoader, pack
from pretrain.config import TrainConfig
from pretrain.metrics import read_metrics
from tokenizer import Tokenizer
from tokenizer.chat_template import encode_chat
from tokenizer.hf import add_chat_template
from fixtures_finetune import (CONVERSATIONS, REPO, TINY_SFT, run_finetune, tiny_hf_model, train_tokenizer,
                               write_sample_files)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def tok_path(root) -> Path:
    return train_tokenizer(root)


@pytest.fixture(scope="module")
def tok(tok_path) -> Tokenizer:
    return Tokenizer(tok_path)


@pytest.fixture(scope="module")
def base(root, tok_path) -> Path:
    return tiny_hf_model(root, tok_path)


def trained_runs(sample) -> list[list[int]]:
    """The trained label ids of a sample, as contiguous runs."""
    runs, current = [], []
    for label in sample.labels.tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def encode(tok, messages, name, cutoff=10_000, **kw):
    turns = templates.encode_turns(templates.get_template(name), tok, messages)
    return build_sample(turns, cutoff, "truncate", kw.get("train_on_prompt", False), kw.get("mask_history", False))[0]


# ---------------------------------------------------------------------------------------------------------------
# Templates and loss masks


@pytest.mark.parametrize("name", list(templates.TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)), ids=["single", "multi-system", "multi3"])
def test_labels_are_exactly_the_replies_plus_eos(tok, name, conv):
    messages = CONVERSATIONS[conv]
    sample = encode(tok, messages, name)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = trained_runs(sample)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == tok.eos_id and tok.eos_id not in run[:-1]
        assert tok.decode(run[:-1]) == reply
    assert sample.ids[0] == tok.bos_id
    # mask_history: only the last reply; train_on_prompt: everything.
    last = trained_runs(encode(tok, messages, name, mask_history=True))
    assert last == [runs[-1]]
    everything = encode(tok, messages, name, train_on_prompt=True)
    assert (everything.labels == everything.ids).all()


@pytest.mark.parametrize("name", list(templates.TEMPLATES))
def test_prompt_tokens_equal_apply_chat_template_of_the_exported_folder(tok, base, tmp_path, name):
    """The exported folder's tokenizer_config.json holds the template: transformers' apply_chat_template gives the
    training tokens of every prompt (history included) and of the whole conversation, and our own rendering of
    the stored Jinja (what finetune.generate uses) gives the same ids."""
    from transformers import AutoTokenizer

    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(base, folder)
    template = templates.get_template(name)
    add_chat_template(folder, template.jinja())
    hf = AutoTokenizer.from_pretrained(folder)
    assert templates.read_chat_template(folder) == template.jinja()
    for messages in CONVERSATIONS:
        sample = encode(tok, messages, name)
        ids = sample.ids.tolist()
        starts = [i for i in range(1, len(ids)) if sample.labels[i] != IGNORE_INDEX
                  and sample.labels[i - 1] == IGNORE_INDEX]  # where each reply starts
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        for start, user in zip(starts, users):
            history = messages[:user + 1]
            expected = ids[:start]
            got = hf.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
            got = got["input_ids"] if not isinstance(got, list) else got
            assert got == expected, (name, hf.apply_chat_template(history, add_generation_prompt=True,
                                                                  tokenize=False))
            assert encode_chat(template.jinja(), tok, history) == expected
        whole = hf.apply_chat_template(messages, tokenize=True)
        whole = whole["input_ids"] if not isinstance(whole, list) else whole
        assert whole == ids
    # Special-token text typed in a message: the default apply_chat_template reads it as those tokens, and so do we.
    typed = [{"role": "user", "content": "a </s> b <s> c <unk> d"}]
    got = hf.apply_chat_template(typed, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert encode_chat(template.jinja(), tok, typed) == got and tok.unk_id in got


def test_default_system_and_roles(tok):
    alpaca = templates.get_template("alpaca")
    text = alpaca.prompt_text("Say hi.", None, first=True)
    assert text.startswith(templates.ALPACA_SYSTEM + "\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert templates.get_template("llama-2").prompt_text("Hi", "Be brief.", True) == \
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    with pytest.raises(ValueError, match="unknown chat template 'nope'; choose one of alpaca"):
        templates.get_template("nope")
    for bad, message in [([{"role": "assistant", "content": "x"}], "roles must alternate"),
                         ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
                         ([{"role": "user", "content": "a"}], "ends with a user message"),
                         ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "reply is empty"),
                         ([{"role": "system", "content": "s"}], "no user/assistant turns")]:
        with pytest.raises(ValueError, match=message):
            templates.check_conversation(bad)


def test_truncation_rules(tok):
    messages = CONVERSATIONS[2]
    turns = templates.encode_turns(templates.get_template("plain"), tok, messages)
    lengths = [len(p) + len(r) for p, r in turns]
    full, truncated = build_sample(turns, sum(lengths), "truncate", False, False)
    assert not truncated and len(full.ids) == sum(lengths)
    # One token short: the last whole turn goes; the rest is untouched.
    cut, truncated = build_sample(turns, sum(lengths) - 1, "truncate", False, False)
    assert truncated and cut.ids.tolist() == full.ids[:lengths[0] + lengths[1]].tolist()
    # Shorter than the first turn: its reply is cut and loses its EOS.
    room = len(turns[0][0]) + 2
    cut, _ = build_sample(turns, room, "truncate", False, False)
    assert len(cut.ids) == room and trained_runs(cut) == [turns[0][1][:2]]
    with pytest.raises(BadRecord, match="all prompt after truncation"):
        build_sample(turns, len(turns[0][0]), "truncate", False, False)
    with pytest.raises(BadRecord, match="longer than cutoff_len"):
        build_sample(turns, sum(lengths) - 1, "drop", False, False)


# ---------------------------------------------------------------------------------------------------------------
# Data layouts and bad input


def test_layouts_give_the_same_conversation():
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2\n\nextra"},
                {"role": "assistant", "content": "a2"}]
    alpaca = {"system": "S", "history": [["q1", "a1"]], "instruction": "q2", "input": "extra", "output": "a2"}
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                                  {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2\n\nextra"},
                                  {"from": "gpt", "value": "a2"}]}
    openai = {"messages": expected}
    belle = {"question": "q2", "std_answer": "a2", "class": "math"}
    assert to_messages(alpaca) == to_messages(sharegpt) == to_messages(openai) == expected
    fields = Fields(instruction="question", output="std_answer")
    assert to_messages(belle, "alpaca", fields) == [{"role": "user", "content": "q2"},
                                                     {"role": "assistant", "content": "a2"}]


def test_files_mixed_and_bad_records_counted_or_fatal(tok, tmp_path):
    good = {"instruction": "计算 1 加 2。", "output": "1加2等于3。"}
    lines = [good, {"instruction": "no output"}, {"conversations": [{"from": "gpt", "value": "first"}]},
             {"instruction": "empty", "output": ""}, good]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines) + "\n")
    listed = tmp_path / "b.json.gz"
    with gzip.open(listed, "wt", encoding="utf-8") as f:
        json.dump([good, {"messages": [{"role": "user", "content": "x"}]}], f)
    template = templates.get_template("alpaca")
    samples, report = load_samples([str(jsonl), str(listed)], template, tok, DataOptions())
    assert (report.records, report.samples, len(samples)) == (7, 3, 3)
    assert report.skipped == {"missing field 'output'": 1, "roles must alternate user/assistant after an optional "
                              "system message": 1, "an assistant reply is empty": 1,
                              "the conversation ends with a user message": 1}
    assert f"{jsonl}:2: missing field 'output'" in report.examples
    assert "4 skipped" in report.summary("train")

    with pytest.raises(ValueError, match=r"a\.jsonl:2: missing field 'output' \(bad_records=skip skips"):
        load_samples([str(jsonl)], template, tok, DataOptions(bad_records="error"))
    broken = tmp_path / "c.jsonl"
    broken.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: invalid JSON"):
        load_samples([str(broken)], template, tok, DataOptions())
    not_list = tmp_path / "d.json"
    not_list.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="must hold a list of records"):
        load_samples([str(not_list)], template, tok, DataOptions())
    with pytest.raises(FileNotFoundError, match="instruction file not found"):
        load_samples([str(tmp_path / "missing.jsonl")], template, tok, DataOptions())
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="no usable instruction records"):
        load_samples([str(empty)], template, tok, DataOptions())


def test_file_errors_name_line_column_and_record(tok, tmp_path):
    template = templates.get_template("alpaca")
    good = json.dumps({"instruction": "a", "output": "b"})
    # A byte that is not UTF-8 on line 3 of a .jsonl, and on line 2 of a .json: the line in the file, the byte and
    # its column, whatever buffer the decoder read it in.
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((good + "\n" + good + "\n").encode() + b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl:3: not UTF-8 text \(byte 0xe9 at byte column 21\)"):
        load_samples([str(latin)], template, tok, DataOptions())
    big = tmp_path / "big.json"
    big.write_bytes(b"[\n" + b"x" * 70_000 + b"\n\xff]")
    with pytest.raises(UserError, match=r"big\.json:3: not UTF-8 text \(byte 0xff at byte column 1\)"):
        load_samples([str(big)], template, tok, DataOptions())
    # Bad JSON: the line and the column (1-based, in characters) where the parser stopped.
    for name, text, where in [("c.jsonl", good + '\n  {"instruction": "一二", "output" "b"}\n', "c.jsonl:2: .* column 34"),
                              ("c.json", '[\n' + good + ',\n  {"instruction": "一二",, "output": "b"}\n]',
                               "c.json:3: .* column 24")]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=f"{where}"):
            load_samples([str(path)], template, tok, DataOptions())
    # A skipped record of a .json list is named by its 1-based number.
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "no output"}]))
    _, report = load_samples([str(listed)], template, tok, DataOptions())
    assert report.examples == [f"{listed}: record 2: missing field 'output'"]
    assert report.to_dict()["skipped"] == {"missing field 'output'": 1} and report.to_dict()["samples"] == 1


def test_inherited_fields_that_do_not_apply_are_refused_by_name(tmp_path):
    for override, name in [("data_dir=runs/x", "data_dir"), ("model_preset=1b", "model_preset"),
                           ("init_from_hf=hf", "init_from_hf")]:
        with pytest.raises(UserError, match=f"command line: {name} does not apply to fine-tuning"):
            load_finetune_config(None, [override])
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: runs/x\n")
    with pytest.raises(UserError, match=r"c\.yaml: data_dir does not apply to fine-tuning: the data are data_files"):
        load_finetune_config(path)
    with pytest.raises(UserError, match="model_preset does not apply to fine-tuning"):
        FinetuneConfig(model_preset="1b")
    # The defaults that differ from pretraining are FinetuneConfig's; the fields' types and help are TrainConfig's.
    assert (FinetuneConfig().seq_len, TrainConfig().seq_len) == (256, 128)
    source = inspect.getsource(FinetuneConfig)
    assert not re.search(r"^\s+(seq_len|lr|run_dir|max_steps):", source, re.M)  # not declared again
    assert reflect.field_help(FinetuneConfig)["seq_len"] == reflect.field_help(TrainConfig)["seq_len"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FinetuneConfig().lr = 1.0  # type: ignore[misc]
    # train_only_embeddings: honoured by a full fine-tune, refused for LoRA.
    from finetune.train import prepare_full  # imports DeepSpeed: only here (test_common checks module imports)

    with pytest.raises(UserError, match="train_only_embeddings needs finetuning_type=full"):
        load_finetune_config(None, ["finetuning_type=lora", "train_only_embeddings=true"])
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig.from_preset("debug", vocab_size=64, dim=32, n_layers=1, n_heads=2))
    prepare_full(model, dataclasses.replace(FinetuneConfig(), train_only_embeddings=True))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"tok_embeddings.weight", "output.weight"}
    prepare_full(model, FinetuneConfig())
    assert all(p.requires_grad for p in model.parameters())


def test_runtime_settings_change_how_the_model_runs_not_what_it_computes(base, tok, tmp_path):
    """The model fine-tuning builds with other runtime fields computes what the plain model does (same weights),
    and a model field that is not a runtime one is refused by name."""
    from finetune.train import FinetuneTask
    from model import Transformer

    cfg = load_finetune_config(None, [f"model_path={base}", f"run_dir={tmp_path / 'run'}", "data_files=[x.json]",
                                      "model.fused_kernels=false", "model.attn_impl=eager"])
    model = FinetuneTask(cfg).build_model(tok, resuming=False, zero3_config=None)
    plain = Transformer.from_hf(base).float().eval()
    assert (model.config.fused_kernels, model.config.attn_impl) == (False, "eager")
    assert dataclasses.replace(model.config, fused_kernels=True, attn_impl="auto") == plain.config
    tokens = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), plain(tokens))
    with pytest.raises(UserError, match="model.dim: the architecture comes from model_path"):
        load_finetune_config(None, ["model.dim=64"])


def test_config_file_spells_out_the_defaults_and_checks_keys():
    assert load_finetune_config(REPO / "config" / "finetune_debug.yaml") == FinetuneConfig()
    cfg = load_finetune_config(REPO / "config" / "finetune_7b.yaml")
    assert cfg.zero_stage == 3 and cfg.precision == "bf16" and len(cfg.data_files) == 2
    assert load_finetune_config(None, ["data_files=[a.json, b.jsonl]"]).data_files == ["a.json", "b.jsonl"]
    for overrides, message in [(["template=nope"], "unknown chat template 'nope'"),
                               (["finetuning_type=qlora"], "finetuning_type must be one of full"),
                               (["model.dim=128"], "model.dim: the architecture comes from model_path"),
                               (["cutoff_len=4096"], "cutoff_len must be in"),
                               (["packing=maybe"], "packing: expected bool")]:
        with pytest.raises(ValueError, match=message):
            load_finetune_config(None, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Packing and the loss


def test_packing_fits_rows_and_covers_every_sample_once_per_epoch(tok, tmp_path):
    lengths = [5, 9, 3, 7, 7, 2, 10, 1, 4]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows) and len(rows) == 5  # 48 positions: 5 rows is optimal
    samples, _ = load_samples(write_sample_files(tmp_path), templates.get_template("plain"), tok, DataOptions())
    one = InstructionLoader(samples, 96, 1, tok.eos_id, seed=3)
    epoch0 = [one.row_indices(s)[0] for s in range(one.num_rows)]
    epoch1 = [one.row_indices(s)[0] for s in range(one.num_rows, 2 * one.num_rows)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(one.num_rows)) and epoch0 != epoch1  # reshuffled
    used = sum(len(x.ids) - 1 for x in samples)
    assert one.padding_fraction() == pytest.approx(1 - used / (one.num_rows * 96))
    wide = InstructionLoader(samples, 256, 1, tok.eos_id)
    loads = [sum(len(samples[i].ids) - 1 for i in row) for row in wide.rows]
    assert max(loads) <= 256 and len(wide.rows) < len(samples) / 2
    # An any-fit packer opens a row only for a sample no open row can take: no two rows would fit in one.
    assert all(a + b > 256 for i, a in enumerate(loads) for b in loads[i + 1:])
    loader = InstructionLoader(samples, 96, 2, tok.eos_id, seed=3)
    batch = loader.next_batch()
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == batch.tokens.numel() and batch.tokens.shape == (2, 96)
    rows = [loader.rows[r] for r in loader.row_indices(0)]
    assert batch.num_tokens == sum(len(samples[i].ids) - 1 for row in rows for i in row) < batch.tokens.numel()
    flat = batch.position_ids.flatten().tolist()
    assert all(flat[c] == 0 for c in cu[:-1])  # positions restart at every sample
    # Exact resume: a fresh loader given the state continues with the same batches.
    loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    again = InstructionLoader(samples, 96, 2, tok.eos_id, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch().tokens, expected.tokens)
    with pytest.raises(ValueError, match="seq_len .* changed since the checkpoint"):
        InstructionLoader(samples, 128, 2, tok.eos_id, seed=3).load_state_dict(state)


def test_packed_loss_equals_unpacked_loss(tok, base, tmp_path):
    from model import Transformer

    model = Transformer.from_hf(base).float().eval()
    samples, _ = load_samples(write_sample_files(tmp_path), templates.get_template("vicuna"), tok, DataOptions())
    samples = samples[:6]
    total_len = sum(len(s.ids) - 1 for s in samples)
    packed = InstructionLoader(samples, total_len, 1, tok.eos_id, shuffle=False).next_batch()
    padded = InstructionLoader(samples, total_len, len(samples), tok.eos_id, shuffle=False, packing=False).next_batch()
    assert packed.tokens.shape == (1, total_len) and padded.tokens.shape[0] == 6
    with torch.no_grad():
        a = model(packed.tokens, packed.targets, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)
        b = model(padded.tokens, padded.targets, position_ids=padded.position_ids, cu_seqlens=padded.cu_seqlens)
        # And one sample at a time, weighted by its targets: what the per-token mean means.
        sums = [model(torch.tensor(s.ids[None, :-1], dtype=torch.long),
                      torch.tensor(s.labels[None, 1:], dtype=torch.long)) * int((s.labels[1:] != -100).sum())
                for s in samples]
    count = sum(int((s.labels[1:] != -100).sum()) for s in samples)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, torch.stack(sums).sum() / count, rtol=1e-5, atol=1e-5)


def run_args(tmp_path: Path, base: Path, files: list[Path], *more: str) -> list[str]:
    return [*TINY_SFT, f"model_path={base}", f"run_dir={tmp_path / 'run'}",
            f"data_files=[{', '.join(map(str, files))}]", *more]


@pytest.mark.slow  # ~50 s: two fine-tuning runs (scripts/test.sh --fast skips it)
def test_accumulation_4x1_equals_1x4(base, tmp_path):
    """Rows with different numbers of targets: the step's loss and gradient are the mean over all its target tokens,
    so 4 accumulated micro batches of 1 train exactly like 1 micro batch of 4."""
    from artifacts.run_dir import consolidated_state_dict

    files = write_sample_files(tmp_path)
    runs = {}
    for micro in (1, 4):
        out = tmp_path / f"m{micro}"
        args = run_args(out, base, files, f"micro_batch_size={micro}", "global_batch_size=4", "max_steps=3",
                        "eval_interval=0", "save_interval=3", "packing=false", "seq_len=128")
        result = run_finetune(args)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[micro] = out / "run"
    losses = {m: [r["loss"] for r in read_metrics(d) if "loss" in r] for m, d in runs.items()}
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[4], rel=1e-5)
    a, b = consolidated_state_dict(runs[1]), consolidated_state_dict(runs[4])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


def test_run_writes_template_and_exports_with_it(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export import main as export_main

    files = write_sample_files(tmp_path)
    result = run_finetune(run_args(tmp_path, base, files, "max_steps=2", "eval_interval=2", "save_interval=2",
                                   "template=chatml"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert "52 records -> 52 samples" in result.stdout and "validation: 4 samples held out" in result.stdout
    assert (run / "chat_template.jinja").read_text().strip() == templates.get_template("chatml").jinja()
    report = json.loads((run / "data_report.json").read_text())  # the counts README and docs/finetune.md promise
    assert report["data_files"]["records"] == 52 and report["data_files"]["samples"] == 52
    assert report["data_files"]["skipped_total"] == 0 and report["val_files"] is None
    assert (report["train_samples"], report["val_samples"]) == (48, 4)
    rows = read_metrics(run)
    assert any("val_loss" in r for r in rows) and all(r["target_tokens_per_sec"] > 0 for r in rows if "loss" in r)
    export_main(["--run_dir", str(run), "--output_dir", str(tmp_path / "hf")])
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.chat_template == templates.get_template("chatml").jinja()
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with pytest.raises(SystemExit):
        export_main(["--run_dir", str(run), "--output_dir", str(tmp_path / "hf")])  # exists: needs --overwrite


@pytest.mark.slow  # ~17 s: several CLI processes (scripts/test.sh --fast skips it)
def test_cli_errors_are_one_line(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    for args, message in [(["template=nope"], "unknown chat template 'nope'"),
                          ([f"data_files={bad}"], "bad.jsonl:2: invalid JSON"),
                          ([f"data_files={tmp_path / 'none.json'}"], "none.json: instruction file not found"),
                          (["model_path=/nonexistent"], "tokenizer.model: tokenizer not found")]:
        result = run_finetune([f"model_path={base}", f"run_dir={tmp_path / 'run'}", *args])
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and last.startswith("error: ") and message in last, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


# ---------------------------------------------------------------------------------------------------------------
# Batch generation


def test_generate_batches_prompt_lists_and_instruction_files(base, tmp_path, capsys):
    from finetune.generate import main as generate_main

    prompts = tmp_path / "01qa.json"
    prompts.write_text(json.dumps(["天空为什么是蓝的", "What is 2 plus 2?", "天空为什么是红的", "列举三种水果"],
                                  ensure_ascii=False))
    files = write_sample_files(tmp_path)
    out = {}
    for batch in (1, 8):
        out[batch] = tmp_path / f"answers{batch}.jsonl"
        generate_main(["--model", str(base), "--input", str(prompts), str(files[1]), "--output", str(out[batch]),
                       "--template", "vicuna", "--max_new_tokens", "6", "--batch_size", str(batch)])
    rows = [json.loads(line) for line in out[8].read_text().splitlines()]
    assert len(rows) == 4 + 12 and rows[0]["messages"] == [{"role": "user", "content": "天空为什么是蓝的"}]
    assert rows[4]["reference"] and rows[4]["messages"][-1]["role"] == "user"  # the last reply is the reference
    assert all(isinstance(r["answer"], str) for r in rows)
    # Greedy answers do not depend on how prompts were batched.
    assert [r["answer"] for r in rows] == [json.loads(x)["answer"] for x in out[1].read_text().splitlines()]
    meta = json.loads((tmp_path / "answers8.jsonl.meta.json").read_text())
    assert meta["sampling"]["batch_size"] == 8 and meta["chat_template"] == templates.get_template("vicuna").jinja()
    assert meta["batches"] == 2  # 16 prompts of many token lengths, 8 to a batch

    with pytest.raises(SystemExit):  # the base model stores no template: one line saying to pass --template
        generate_main(["--model", str(base), "--input", str(prompts), "--output", str(tmp_path / "x.jsonl")])
    assert "stores no chat template" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_generate_batches_prompts_of_different_lengths_like_one_at_a_time(base, tok, tmp_path):
    from finetune.generate import main as generate_main

    questions = ["天", "What is 2 plus 2?", "列举三种水果，并说明它们的颜色和产地", "Hi", "天空为什么是蓝的？请解释。"]
    lengths = [len(encode_chat(templates.get_template("alpaca").jinja(), tok, [{"role": "user", "content": q}]))
               for q in questions]
    assert len(set(lengths)) == len(questions)  # every batch below mixes token lengths
    prompts = tmp_path / "mixed.json"
    prompts.write_text(json.dumps(questions, ensure_ascii=False))
    answers, metas = {}, {}
    for batch in (1, 3):
        out = tmp_path / f"mixed{batch}.jsonl"
        generate_main(["--model", str(base), "--input", str(prompts), "--output", str(out), "--template", "alpaca",
                       "--max_new_tokens", "7", "--batch_size", str(batch)])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["messages"][-1]["content"] for r in rows] == questions  # input order, whatever the batching
        answers[batch] = [r["answer"] for r in rows]
        metas[batch] = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert answers[3] == answers[1]
    assert (metas[1]["batches"], metas[3]["batches"]) == (5, 2)
    assert metas[3]["new_tokens"] == metas[1]["new_tokens"] > 0


@pytest.mark.slow  # ~10 s: two fine-tuning runs (scripts/test.sh --fast skips it)
def test_resuming_with_another_template_is_refused_before_anything_is_rewritten(base, tmp_path):
    files = write_sample_files(tmp_path)
    args = run_args(tmp_path, base, files, "max_steps=1", "eval_interval=0", "save_interval=1")
    assert run_finetune(args).returncode == 0
    template = (tmp_path / "run" / "chat_template.jinja").read_text()
    result = run_finetune([*args, "max_steps=2", "template=vicuna"])
    assert result.returncode != 0
    assert "started with other settings (template 'alpaca' -> 'vicuna')" in result.stderr.strip().splitlines()[-1]
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == template
    assert (tmp_path / "run" / "latest").read_text() == "step_000001"

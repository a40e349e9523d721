"""lm-evaluation-harness's `local-completions` model runs a loglikelihood (multiple-choice) task through the server
with its default tokenized requests and a batch size of 2, and every request's log-likelihood equals lm-eval's own
`hf` backend on the same exported folder (fp32) within 1e-4. The task is local: a jsonl file in tests/lm_eval_tiny
and a task YAML written next to it at test time (no hub)."""
import json
from pathlib import Path

import pytest

from fixtures_inference import ServerThread, make_model_folder
from inference.engine import Engine
from inference.server import create_app
from inference.templates import load_chat_template

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api], which local-completions needs

DATA = Path(__file__).parent / "lm_eval_tiny" / "tiny_choice.jsonl"
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


class Recorder:
    """ASGI middleware keeping the JSON bodies of /v1/completions requests."""

    def __init__(self, app):
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        chunks = []

        async def keep():
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                self.bodies.append(json.loads(b"".join(chunks)))
            return message

        return await self.app(scope, keep, send)


def run(model: str, model_args: dict, tasks_dir: Path) -> list[dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["tiny_choice"], device="cpu",
                          task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True)
    return sorted(out["samples"]["tiny_choice"], key=lambda s: s["doc_id"])


@pytest.mark.slow  # ~10 s: lm-eval's task building and two models
def test_lm_eval_local_completions_equals_hf_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, chat_dir, model, tok = make_model_folder(tmp_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(TASK.format(data=DATA.resolve()))
    engine = Engine(model, tok, slots=4, max_queue=16).start()
    recorder = Recorder(create_app(engine, load_chat_template(chat_dir, tok), "tiny"))
    try:
        with ServerThread(recorder) as srv:
            served = run("local-completions", {
                "base_url": f"{srv.url}/v1/completions", "model": "tiny", "tokenizer": str(base),
                "tokenizer_backend": "huggingface", "batch_size": 2, "add_bos_token": True, "max_retries": 1,
            }, tasks)
    finally:
        engine.stop()
    reference = run("hf", {"pretrained": str(base), "dtype": "float32", "batch_size": 2, "add_bos_token": True},
                    tasks)

    # What lm-eval sent: token-id prompts, two per request, echo + logprobs, as its default mode does.
    prompts = [b["prompt"] for b in recorder.bodies]
    assert prompts and all(b["echo"] is True and b["logprobs"] == 1 for b in recorder.bodies)
    assert max(len(p) for p in prompts) == 2 and all(isinstance(i, int) for p in prompts for q in p for i in q)
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert sum(len(p) for p in prompts) == sum(len(d["choices"]) for d in docs)  # one request per choice
    assert len(served) == len(reference) == 5
    lls = [float(a[0][0]) for s in served for a in s["resps"]]
    assert all(ll < 0 for ll in lls) and len({round(ll, 3) for ll in lls}) > 10  # real, distinct scores
    for s, r in zip(served, reference):
        assert s["doc_id"] == r["doc_id"] and len(s["resps"]) == len(r["resps"]) == 3
        for (ll_s, greedy_s), (ll_r, greedy_r) in ([a[0], b[0]] for a, b in zip(s["resps"], r["resps"])):
            assert float(ll_s) == pytest.approx(float(ll_r), abs=1e-4)
            assert bool(greedy_s) == bool(greedy_r)

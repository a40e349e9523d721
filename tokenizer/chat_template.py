"""A model's Jinja chat template: where it is stored and how it is compiled, exactly as transformers does.

One place for every stage that turns messages into a prompt: fine-tuning (the training prompts), evaluation (the
judged answers) and inference (chat, server, web). Compiling follows transformers' apply_chat_template: a
sandboxed Jinja environment with trim_blocks/lstrip_blocks, the loop-control extension and the
`{% generation %}` tag, a `tojson` filter that does not escape HTML, `raise_exception` and `strftime_now`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The file a template is stored in beside a model (fine-tuning writes it into its run directory)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same one for every request); raises
    jinja2.TemplateError for one that does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def find_chat_template(model_path: str | Path) -> tuple[str, str] | None:
    """(template source, the file it came from) for a model folder or run directory, or None when it has none.

    Looked for in tokenizer_config.json's `chat_template` (a string, or the named-templates list whose "default" is
    taken), then in chat_template.jinja; in the folder itself, then in its hf/ export (a training run directory).
    """
    path = Path(model_path)
    for candidate in (path / "tokenizer_config.json", path / "hf" / "tokenizer_config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{candidate}: not valid JSON ({e})") from None
            template = config.get("chat_template")
            if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if template is not None:
                if not isinstance(template, str):
                    raise ValueError(f"{candidate}: chat_template must be a string")
                return template, str(candidate)
    for candidate in (path / CHAT_TEMPLATE_FILE, path / "hf" / CHAT_TEMPLATE_FILE):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8"), str(candidate)
    return None

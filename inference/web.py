"""A Gradio chat page on top of the continuous-batching engine: streaming replies, history, sampling sliders.

    python -m inference.web --model out/sft/hf [--port 7860 --slots 4]

Then open http://127.0.0.1:7860. The page is local-only unless --host says otherwise (and never uses Gradio's
share links). Several browser tabs chat at once: their replies are decoded together by the engine.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from common.cli import entry_point, parser

from .chat import Chat, add_sampling_args, sampling_from_args
from .engine import SamplingParams
from .loader import add_model_args, load, make_engine
from .server import bind_port


def history_messages(history: list[Any]) -> list[dict[str, str]]:
    """Gradio's chat history (messages whose content is a string or a list of parts) as plain text messages."""
    out = []
    for m in history or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]; files are skipped
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str) and m.get("role") in ("user", "assistant"):
            out.append({"role": m["role"], "content": content})
    return out


def build_demo(chat: Chat, defaults: SamplingParams, title: str = "Chat", concurrency: int = 4):
    import gradio as gr

    def respond(message: str, history: list, system: str, temperature: float, top_p: float, top_k: int,
                repetition_penalty: float, max_tokens: int) -> Iterator[str]:
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += history_messages(history) + [{"role": "user", "content": message}]
        sampling = dict(temperature=float(temperature), top_p=None if top_p >= 1 else float(top_p),
                        top_k=int(top_k) or None, repetition_penalty=float(repetition_penalty),
                        max_tokens=int(max_tokens))
        reply = ""
        try:
            for piece in chat.stream(messages, **sampling):
                reply += piece
                yield reply.lstrip()
        except ValueError as e:  # a conversation longer than the context, a template error, ...
            raise gr.Error(str(e)) from None

    inputs = [
        gr.Textbox("", label="System message"),
        gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=defaults.top_p or 1.0, step=0.05, label="Top-p"),
        gr.Slider(0, 200, value=defaults.top_k or 0, step=1, label="Top-k (0 = off)"),
        gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
        gr.Slider(1, chat.engine.max_len - 1, value=min(defaults.max_tokens or 256, chat.engine.max_len - 1), step=1,
                  label="Max new tokens"),
    ]
    return gr.ChatInterface(respond, additional_inputs=inputs, title=title, analytics_enabled=False,
                            concurrency_limit=concurrency, flagging_mode="never")


def launch(demo: Any, host: str, port: int, slots: int, block: bool = True) -> str:
    """Serve the page on host:port and print its address; block until Ctrl-C unless `block` is False. Returns the
    page's URL.

    Gradio's own start-up text is silenced (quiet=True): besides the address it tells the user to "set
    `share=True`", which this page deliberately never does (share links expose it to the internet)."""
    demo.queue(default_concurrency_limit=slots).launch(server_name=host, server_port=port, share=False,
                                                       ssr_mode=False, quiet=True, prevent_thread_lock=True)
    url = f"http://{host}:{port}"
    print(f"* Running on local URL:  {url} (Ctrl-C stops it)", flush=True)
    if block:
        demo.block_thread()
    return url


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m inference.web", __doc__)
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port to listen on (checked before the model loads)")
    p.add_argument("--slots", type=int, default=4, help="conversations decoded together (KV-cache slots)")
    args = p.parse_args(argv)
    # A port in use is found now rather than after loading the model; Gradio binds it itself, so it is released
    # again here (another process could take it in between, and Gradio's own error would then say so).
    bind_port(args.host, args.port).close()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    loaded = load(args)
    chat = Chat(make_engine(loaded, args.slots, args.max_len), loaded.template)
    demo = build_demo(chat, sampling_from_args(args), title=f"Chat with {args.model}", concurrency=args.slots)
    try:
        launch(demo, args.host, args.port, args.slots)
    finally:
        chat.close()


if __name__ == "__main__":
    main()

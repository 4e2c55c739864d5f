"""Hypothesis strategies for harmony conversations, as openai-harmony JSON dicts."""

from __future__ import annotations

from hypothesis import strategies as st

# Text that stresses the tokenizer and the renderer: unicode, whitespace runs, CRLF,
# special-token spellings as plain text, TypeScript-ish punctuation.
FRAGMENTS = [
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|constrain|>",
    "to=",
    "\r\n",
    "\n\n",
    "  ",
    "\t",
    "json",
    "functions.",
    "final",
    "analysis",
    "{",
    "}",
    "//",
    "é",
    "🎉",
    "中文",
    "\u2028",
    "\x0b",
]
text = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=6).map("".join),
)
word = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,9}", fullmatch=True)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0.5, -2.25, 3.0, 1e-3, 1e21, 1.5e-7]),
    text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(word, inner, max_size=3)),
    max_leaves=6,
)


def _decorate(schema: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw):
        s = dict(draw(schema))
        if draw(st.booleans()):
            s["description"] = draw(text)
        if draw(st.integers(0, 5)) == 0:
            s["title"] = draw(text)
        if draw(st.integers(0, 5)) == 0:
            s["nullable"] = True
        if draw(st.integers(0, 4)) == 0:
            s["default"] = draw(json_value)
        if draw(st.integers(0, 6)) == 0:
            s["examples"] = draw(st.lists(text, max_size=2))
        return s

    return build()


leaf_schema = st.one_of(
    st.just({"type": "string"}),
    st.lists(text, min_size=1, max_size=3).map(lambda v: {"type": "string", "enum": v}),
    st.sampled_from([{"type": "number"}, {"type": "integer"}, {"type": "boolean"}]),
    st.just({"type": ["string", "integer", "null"]}),
    st.just({"type": "array"}),
    st.just({}),
)


def _object(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw):
        props = draw(st.dictionaries(word, children, max_size=4))
        schema = {"type": "object", "properties": props}
        names = list(props)
        if names and draw(st.booleans()):
            schema["required"] = draw(st.lists(st.sampled_from(names), unique=True))
        return schema

    return build()


schema = st.recursive(
    _decorate(leaf_schema),
    lambda inner: st.one_of(
        _object(inner),
        inner.map(lambda s: {"type": "array", "items": s}),
        st.lists(inner, min_size=1, max_size=3).map(lambda v: {"oneOf": v}),
    ).flatmap(lambda s: _decorate(st.just(s))),
    max_leaves=8,
)
parameters = _object(schema)


@st.composite
def tool(draw):
    out = {"name": draw(word), "description": draw(text)}
    if draw(st.integers(0, 3)):
        out["parameters"] = draw(parameters)
    return out


@st.composite
def namespace(draw, name):
    ns = {"name": name, "tools": draw(st.lists(tool(), max_size=3))}
    if draw(st.booleans()):
        ns["description"] = draw(text)
    return ns


@st.composite
def tools(draw):
    out = {}
    if draw(st.booleans()):
        out["functions"] = draw(namespace("functions"))
    for name in draw(st.lists(st.sampled_from(["browser", "python", "zeta"]), unique=True)):
        out[name] = draw(namespace(name))
    return out


date = st.dates().map(lambda d: d.isoformat())
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731


@st.composite
def system_content(draw):
    out = {
        "type": "system_content",
        "model_identity": draw(maybe(text)),
        "reasoning_effort": draw(maybe(st.sampled_from(["Low", "Medium", "High"]))),
        "conversation_start_date": draw(maybe(date)),
        "knowledge_cutoff": draw(maybe(st.sampled_from(["2024-06", "2023-10"]))),
        "channel_config": draw(
            maybe(
                st.fixed_dictionaries(
                    {
                        "valid_channels": st.lists(
                            st.sampled_from(["analysis", "commentary", "final"]), unique=True
                        ),
                        "channel_required": st.booleans(),
                    }
                )
            )
        ),
    }
    if draw(st.integers(0, 3)) == 0:
        out["tools"] = draw(tools())
    return out


@st.composite
def developer_content(draw):
    out = {"type": "developer_content"}
    if draw(st.booleans()):
        out["instructions"] = draw(text)
    if draw(st.booleans()):
        out["tools"] = draw(tools())
    return out


def _message(role, content, name=None, **extra):
    out = {"role": role, "name": name, "content": content}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


channel = st.sampled_from(["analysis", "commentary", "final", None, "final", "analysis"])
content_type = st.sampled_from([None, None, "<|constrain|>json", "json", "<|constrain|>"])


@st.composite
def turn(draw):
    kind = draw(st.sampled_from(["user", "user", "assistant", "assistant", "call", "tool"]))
    body = [{"type": "text", "text": draw(text)}]
    if kind == "user":
        return _message("user", body, name=draw(st.sampled_from([None, None, "bob"])))
    if kind == "assistant":
        return _message("assistant", body, channel=draw(channel))
    fn = "functions." + draw(word)
    if kind == "call":
        recipient = draw(st.sampled_from([fn, fn, "all", "browser.search"]))
        return _message(
            "assistant",
            body,
            channel="commentary",
            recipient=recipient,
            content_type=draw(content_type),
        )
    return _message("tool", body, name=fn, channel="commentary", recipient="assistant")


@st.composite
def conversation(draw):
    messages = []
    if draw(st.integers(0, 4)):
        messages.append(_message("system", [draw(system_content())]))
    if draw(st.booleans()):
        messages.append(_message("developer", [draw(developer_content())]))
    messages += draw(st.lists(turn(), max_size=7))
    return {"messages": messages}


@st.composite
def assistant_messages(draw):
    """What a model might emit: assistant and tool-call messages."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        m = draw(turn())
        if m["role"] in ("assistant",):
            out.append(m)
        elif m["role"] == "user":
            out.append(_message("assistant", m["content"], channel=draw(channel)))
        else:
            out.append(
                _message(
                    "assistant",
                    m["content"],
                    channel="commentary",
                    recipient="functions." + draw(word),
                    content_type=draw(content_type),
                )
            )
    return out

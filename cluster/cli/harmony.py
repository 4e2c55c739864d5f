"""`gptoss-ray harmony render|parse`: the chat format from the command line."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    harmony = sub.add_parser("harmony", help="render and parse the harmony chat format")
    cmds = harmony.add_subparsers(dest="harmony_command", required=True)

    render = cmds.add_parser(
        "render",
        help="conversation JSON -> token ids",
        description="Read a conversation in openai-harmony's JSON (or, with --openai, an "
        "OpenAI chat request) and print the prompt's token ids as a JSON list.",
    )
    render.add_argument("file", help="JSON file, or - for standard input")
    render.add_argument("--openai", action="store_true", help="the file is an OpenAI chat request")
    render.add_argument("--text", action="store_true", help="print the decoded text instead")
    render.add_argument(
        "--training", action="store_true", help="render for training (ends with <|return|>)"
    )
    render.add_argument(
        "--date",
        default=datetime.date.today().isoformat(),
        help="with --openai: the conversation start date in the system message "
        "(default today; 'none' leaves it out)",
    )
    render.set_defaults(run=render_command)

    parse = cmds.add_parser(
        "parse",
        help="completion token ids -> messages",
        description="Read a JSON list of completion token ids (a file, or standard input) "
        "and print the parsed messages as a JSON list in openai-harmony's message JSON.",
    )
    parse.add_argument(
        "file", nargs="?", default="-", help="JSON file, or - for standard input (the default)"
    )
    parse.add_argument(
        "--role",
        default="assistant",
        help="role of the message the ids start in (default assistant, as after a prompt "
        "rendered for completion); 'none' when the ids start with <|start|>",
    )
    parse.add_argument(
        "--strict", action="store_true", help="fail on malformed harmony, as openai-harmony does"
    )
    parse.set_defaults(run=parse_command)


def render_command(args: argparse.Namespace) -> int:
    from gptoss_ray.model import harmony
    from gptoss_ray.model import tokenizer as tok
    from gptoss_ray.model.harmony.openai_chat import ChatRequest, to_harmony

    raw = sys.stdin.read() if args.file == "-" else _read(args.file)
    if args.openai:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise harmony.HarmonyError(f"{args.file}: not valid JSON: {exc}") from None
        date = None if args.date.lower() == "none" else args.date
        messages = to_harmony(ChatRequest.parse(data), conversation_start_date=date)
    else:
        messages = harmony.Conversation.from_json(raw).messages
    if args.training:
        ids = harmony.render_for_training(messages)
    else:
        ids = harmony.render_for_completion(messages)
    print(tok.decode(ids) if args.text else json.dumps(ids))
    return 0


def parse_command(args: argparse.Namespace) -> int:
    from gptoss_ray.model import harmony

    source = "standard input" if args.file == "-" else args.file
    try:
        ids = json.loads(sys.stdin.read() if args.file == "-" else _read(args.file))
    except json.JSONDecodeError as exc:
        raise harmony.HarmonyError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise harmony.HarmonyError(f"{source}: expected a JSON list of token ids")
    role = None if args.role.lower() == "none" else args.role
    if role is not None and role not in {r.value for r in harmony.Role}:
        raise harmony.HarmonyError(f"--role {role!r}: not a harmony role")
    parser = harmony.StreamParser(role, strict=args.strict)
    for t in ids:
        parser.process(t)
    messages = parser.process_eos().messages
    print(json.dumps([m.to_dict() for m in messages], ensure_ascii=False))
    for problem in parser.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: {exc.strerror}") from None

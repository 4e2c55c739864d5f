"""`gptoss-ray batch submit|status|results|list`: batch jobs from the command line."""

from __future__ import annotations

import argparse
import json


def add_commands(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="submit and follow batch jobs (OpenAI batch format)")
    cmds = batch.add_subparsers(dest="batch_command", required=True)
    for name, help_text in [
        ("submit", "submit a JSONL file of requests"),
        ("status", "a job's progress"),
        ("results", "a job's output records, one JSON per line"),
        ("list", "every job on the cluster"),
        ("cancel", "stop a job (finished lines stay)"),
    ]:
        cmd = cmds.add_parser(name, help=help_text)
        cmd.add_argument("--address", default="auto", help="Ray cluster (default: auto)")
        cmd.add_argument("--name", default="gptoss-ray", help="the engine's name")
        if name == "submit":
            cmd.add_argument("file", help="JSONL: custom_id, method, url, body per line")
            cmd.add_argument("--output", required=True, help="JSONL output (resumed if present)")
            cmd.add_argument("--wait", action="store_true", help="follow it with a progress bar")
        elif name != "list":
            cmd.add_argument("job", help="job id")


def run(args: argparse.Namespace) -> int:
    from gptoss_ray.cluster.client import Client, progress_line, read_results

    client = Client(address=args.address, name=args.name)
    if args.batch_command == "submit":
        job = client.submit(args.file, args.output)
        print(f"job {job.job_id} submitted: {args.file} -> {args.output}", flush=True)
        if args.wait:
            info = job.wait(progress=True)
            print(f"job {job.job_id}: {info['status']}, {info['done']} done, "
                  f"{info['failed']} failed (errors in {info['errors_file']})")  # fmt: skip
            return 0 if info["status"] == "completed" else 1
        return 0
    if args.batch_command == "list":
        for job in client.jobs():
            info = job.status()
            print(f"{job.job_id}  {progress_line(info)}  {info['output']}")
        return 0
    job = client.job(args.job)
    if args.batch_command == "status":
        info = job.status()
        print(progress_line(info))
        print(json.dumps(info, indent=2))
    elif args.batch_command == "results":
        for record in read_results(job.status()["output"]):
            print(json.dumps(record, ensure_ascii=False))
    elif args.batch_command == "cancel":
        job.cancel()
        print(f"job {job.job_id} cancelled")
    return 0

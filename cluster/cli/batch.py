"""`gptoss-ray batch submit|status|results|list|cancel|delete`: batch jobs from the command line."""

from __future__ import annotations

import argparse
import json


def add_commands(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="submit and follow batch jobs (OpenAI batch format)")
    cmds = batch.add_subparsers(dest="batch_command", required=True)
    for name, help_text, run in [
        ("submit", "submit a JSONL file of requests", submit),
        ("status", "a job's progress", status),
        ("results", "a job's output records, one JSON per line", results),
        ("list", "every job on the cluster", list_jobs),
        ("cancel", "stop a job (finished lines stay)", cancel),
        ("delete", "forget a job, cancelling it if it runs (its output stays)", delete),
    ]:
        cmd = cmds.add_parser(name, help=help_text)
        cmd.set_defaults(run=run)
        cmd.add_argument("--address", default="auto", help="Ray cluster (default: auto)")
        cmd.add_argument("--name", default="gptoss-ray", help="the engine's name")
        if name == "submit":
            cmd.add_argument("file", help="JSONL: custom_id, method, url, body per line")
            cmd.add_argument("--output", required=True, help="JSONL output (resumed if present)")
            cmd.add_argument("--wait", action="store_true", help="follow it with a progress bar")
        elif name != "list":
            cmd.add_argument("job", help="job id")


def _client(args: argparse.Namespace):
    from gptoss_ray.cluster.batch.client import Client

    return Client(address=args.address, name=args.name)


def submit(args: argparse.Namespace) -> int:
    job = _client(args).submit(args.file, args.output)
    print(f"job {job.job_id} submitted: {args.file} -> {args.output}", flush=True)
    if args.wait:
        info = job.wait(progress=True)
        print(
            f"job {job.job_id}: {info['status']}, {info['done']} done, "
            f"{info['failed']} failed (errors in {info['errors_file']})"
        )
        return 0 if info["status"] == "completed" else 1
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    from gptoss_ray.cluster.batch.client import progress_line

    for job in _client(args).jobs():
        info = job.status()
        print(f"{job.job_id}  {progress_line(info)}  {info['output']}")
    return 0


def status(args: argparse.Namespace) -> int:
    from gptoss_ray.cluster.batch.client import progress_line

    info = _client(args).job(args.job).status()
    print(progress_line(info))
    print(json.dumps(info, indent=2))
    return 0


def results(args: argparse.Namespace) -> int:
    from gptoss_ray.cluster.batch.client import read_results

    for record in read_results(_client(args).job(args.job).status()["output"]):
        print(json.dumps(record, ensure_ascii=False))
    return 0


def cancel(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job)
    job.cancel()
    print(f"job {job.job_id} cancelled")
    return 0


def delete(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job)
    job.delete()
    print(f"job {job.job_id} deleted (its output stays)")
    return 0

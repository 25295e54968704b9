"""The command line of the benchmark scripts that compile here and time on
the GPU machine (gpu_shapes.py, gpu_long.py): `build DIR [--target T]`
and `run DIR`, plus any argument-free commands a script adds."""

import argparse


def main(doc, build, run, **commands):
    """Parses sys.argv and calls build(args), run(args) or one of
    `commands` (name -> function of no arguments); `doc`'s first paragraph
    is the help's description."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    bp = sub.add_parser("build")
    bp.add_argument("dir")
    bp.add_argument("--target", default="sm_90a")
    rp = sub.add_parser("run")
    rp.add_argument("dir")
    for name in commands:
        sub.add_parser(name)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args)
    elif args.cmd == "run":
        run(args)
    else:
        commands[args.cmd]()

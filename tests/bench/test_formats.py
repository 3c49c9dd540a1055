"""mgtq.bench.formats: the format names are described once, for the CLI and the report."""

from __future__ import annotations


def test_formats_are_described_once_for_the_cli_and_the_report():
    from mgtq.bench.formats import DEFAULT_FORMATS, FORMATS, HELP
    from mgtq.cli import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                  if a.dest == "formats")
    assert action.help == HELP and action.default == ",".join(DEFAULT_FORMATS)
    assert all(f.partition("-")[0] in HELP for f in FORMATS) and "-g64" in HELP and "-cached" in HELP

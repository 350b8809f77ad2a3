#!/usr/bin/env python3
"""Rewrites the option tables of Docs/cli.md ("## Every option of every command")
from `svmemu --experimental-dump-help`: every command, every option, its default
and its help text (which states its range). `make cli-doc` runs it.

Usage: Tools/cli-options.py SVMEMU [Docs/cli.md]"""
import json, subprocess, sys

MARK = "## Every option of every command"

def tables(dump):
    out = []
    def name(a):
        return a["names"][0]["name"] if a.get("names") else a.get("valueName", "?")
    def walk(c, path):
        args = [a for a in c.get("arguments", [])
                if a.get("shouldDisplay", True) and not any(n["name"] in ("help", "h", "version") for n in a.get("names", []))]
        if args and not c.get("subcommands"):
            out.extend(["### `%s`" % path, "", "| option | default | what, range or values |", "| --- | --- | --- |"])
            for a in args:
                flag = "--" + name(a) if a["kind"] != "positional" else name(a).upper() + " ..."
                value = "off" if a["kind"] == "flag" else a.get("defaultValue")
                text = (a.get("abstract") or "").replace("|", "\\|")
                out.append("| `%s` | %s | %s |" % (flag, "`%s`" % value if value not in (None, "") else "-", text))
            out.append("")
        for s in c.get("subcommands", []):
            if s["commandName"] != "help":
                walk(s, path + " " + s["commandName"])
    walk(dump["command"], "svmemu")
    return "\n".join(out)

def main():
    svmemu = sys.argv[1]
    doc = sys.argv[2] if len(sys.argv) > 2 else "Docs/cli.md"
    dump = json.loads(subprocess.run([svmemu, "--experimental-dump-help"], check=True, capture_output=True, text=True).stdout)
    text = open(doc).read()
    head, mark, rest = text.partition(MARK)
    if not mark:
        sys.exit("%s: no '%s' section" % (doc, MARK))
    intro = rest.split("### ", 1)[0]
    new = head + MARK + intro + tables(dump) + "\n"
    with open(doc, "w") as f:
        f.write(new)

main()

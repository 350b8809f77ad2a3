#!/usr/bin/env python3
"""Turn the kernel rig's QEMU console logs into the project's data files.

  rigresults.py livelock --out Data/kernel/livelock.json [--tap Data/kernel/hmm-tests.tap]
                [--selftest-log LOG] [--meta META.json] LOG...
  rigresults.py profile  --out Data/profiles/qemu-tcg-2.json [--meta META.json] LOG...
  rigresults.py table    Data/kernel/livelock.json [--reference OTHER.json]

Two log formats are read:
  * this rig's own (Tools/kernel-rig/guest/init): the guest prints
    "RIG: boot variant=... " once, one "RIG-RESULT {json}" line per livelock
    run, hmm-tests' console output between "RIG: ===== hmm-tests begin/end",
    and the calibration JSON between "RIG-CALIBRATION-BEGIN/END".
  * the reference kit's (shared/kernel-rig/logs, 2026-11-21): "KREF: -----
    livelock case threads=T fault_mutex=M fault_delay_us=D pages=N -----",
    "livelock: ..." lines, hmm-tests' output on the console. The variant comes
    from the file name (instr-* = legacy fault path with the knob patch,
    trylock-* = knob patch + trylock backport, vanilla-* = unmodified).

Only the Python standard library is used.
"""
import argparse
import json
import os
import re
import statistics
import sys

# The 12 cases of the reference RESULTS.md, in its order (threads:mutex:delay).
CANONICAL_CASES = ["1:0:0", "8:0:0", "8:0:50", "8:0:200", "8:1:0", "8:1:5",
                   "8:1:10", "8:1:20", "8:1:50", "8:1:200", "2:1:50", "4:1:50"]

PRINTK = re.compile(r"^\[\s*\d+\.\d+\]")
TAP_LINE = re.compile(r"^(TAP version \d+|1\.\.\d+|ok \d+|not ok \d+|#)")
TOTALS = re.compile(r"^# Totals: pass:(\d+) fail:(\d+) xfail:(\d+) xpass:(\d+) skip:(\d+) error:(\d+)")


def read_lines(path):
    with open(path, "rb") as f:
        data = f.read().decode("utf-8", errors="replace")
    return [line.rstrip("\r") for line in data.split("\n")]


def variant_of(path, lines):
    for line in lines:
        m = re.match(r"^RIG: boot variant=(\S+)", line)
        if m:
            return m.group(1)
    base = os.path.basename(path)
    if base.startswith("instr-") or base.startswith("knob-") or base.startswith("legacy-"):
        return "legacy"
    if base.startswith("trylock-"):
        return "trylock"
    if base.startswith("vanilla-"):
        return "vanilla"
    return "unknown"


def cmdline_of(lines):
    for line in lines:
        m = re.match(r"^(?:KREF|RIG): cmdline (.*)$", line)
        if m:
            return m.group(1).strip()
    return None


# --------------------------------------------------------------- hmm-tests

def tap_of(lines):
    """hmm-tests' TAP stream: the TAP-shaped lines (TAP version, plan, ok /
    not ok, # diagnostics; stdout and the harness's stderr lines alike) of
    the rig's marked block or, in the reference logs, of the console from
    "TAP version" to "# Totals"; the kernel's printk lines and the tests'
    other stderr lines are dropped."""
    out, inside, marked = [], False, False
    for line in lines:
        if line.startswith("RIG: ===== hmm-tests begin"):
            inside, marked, out = True, True, []
            continue
        if line.startswith("RIG: ===== hmm-tests end"):
            return out
        if not marked and line.startswith("TAP version"):
            inside, out = True, []
        if not inside:
            continue
        if PRINTK.match(line) or not TAP_LINE.match(line):
            continue
        out.append(line)
        if not marked and TOTALS.match(line):
            return out
    return out if inside else None


def totals_of(tap):
    for line in tap or []:
        m = TOTALS.match(line)
        if m:
            p, f, xf, xp, s, e = map(int, m.groups())
            return {"pass": p, "fail": f, "skip": s, "xfail": xf, "xpass": xp, "error": e}
    return None


# --------------------------------------------------------------- livelock

def case_fields(threads, mutex, delay):
    return {"case": "%d:%d:%d" % (threads, mutex, delay), "threads": threads,
            "mutex": bool(mutex), "sleepMicros": delay}


def runs_reference(lines):
    """Runs from the reference kit's hmm_livelock output."""
    runs, cur = [], None
    head = re.compile(r"KREF: ----- livelock case threads=(\d+) fault_mutex=(\S+) fault_delay_us=(\S+) pages=(\d+) -----")
    for line in lines:
        m = head.search(line)
        if m:
            t, mu, d, n = m.groups()
            cur = {"threads": int(t), "mutex": 0 if mu in ("-", "0") else 1,
                   "delay": 0 if d == "-" else int(d), "pages": int(n)}
            continue
        if cur is None:
            continue
        m = re.search(r"livelock: threads=\d+ pages=\d+ total=([\d.]+) s", line)
        if m:
            cur["seconds"] = float(m.group(1))
        m = re.search(r"livelock: per-page usec: .* max=([\d.]+)", line)
        if m:
            cur["worst"] = float(m.group(1))
        m = re.search(r"livelock: migrate_to_ram calls=(\d+) \(([\d.]+) per page\)", line)
        if m:
            cur["calls"] = int(m.group(1))
        m = re.search(r"livelock: RESULT HANG: page (\d+) not completed after (\d+) s; fault_calls so far=(\d+) \(start (\d+)\)", line)
        if m:
            cur["hang"] = (int(m.group(1)), int(m.group(2)), int(m.group(3)) - int(m.group(4)))
        m = re.search(r"KREF: ----- livelock case .* rc=(\d+) -----", line)
        if m:
            c = cur
            cur = None
            run = dict(case_fields(c["threads"], c["mutex"], c["delay"]))
            run["pages"] = c["pages"]
            if "hang" in c:
                page, wd, calls = c["hang"]
                run.update(outcome="livelock", callsPerPage=None, seconds=float(wd),
                           stalledPage=page, callsPerSecond=round(calls / wd, 1))
            elif "calls" in c and "seconds" in c:
                run.update(outcome="completes", callsPerPage=round(c["calls"] / c["pages"], 2),
                           seconds=round(c["seconds"], 4))
                if "worst" in c:
                    run["worstPageMicros"] = round(c["worst"], 1)
            else:
                run.update(outcome="error", callsPerPage=None, seconds=None, rc=int(m.group(1)))
            runs.append(run)
    return runs


def runs_rig(lines):
    """Runs from this rig's livelock program: one RIG-RESULT JSON line each."""
    runs = []
    for line in lines:
        i = line.find("RIG-RESULT ")
        if i < 0:
            continue
        try:
            r = json.loads(line[i + len("RIG-RESULT "):])
        except json.JSONDecodeError:
            continue
        run = dict(case_fields(r["threads"], r["mutex"], r["sleepMicros"]))
        run["pages"] = r["pages"]
        if r["outcome"] == "livelock":
            run.update(outcome="livelock", callsPerPage=None, seconds=float(r["watchdogSeconds"]),
                       stalledPage=r["stalledPage"], callsPerSecond=r["callsPerSecond"])
        elif r["outcome"] == "completes":
            run.update(outcome="completes", callsPerPage=r["callsPerPage"], seconds=r["seconds"],
                       worstPageMicros=r.get("worstPageMicros"))
        else:
            run.update(outcome=r["outcome"], callsPerPage=None, seconds=None)
        runs.append(run)
    return runs


def case_key(name):
    if name in CANONICAL_CASES:
        return (0, CANONICAL_CASES.index(name), name)
    t, m, d = (int(x) for x in name.split(":"))
    return (1, (t, m, d), name)


def livelock(args):
    meta = load_meta(args.meta)
    grouped = {}
    boots = {"legacy": 0, "trylock": 0}
    qemu, date = meta.get("qemu"), meta.get("date")
    selftest_log = args.selftest_log
    for path in args.logs:
        lines = read_lines(path)
        variant = variant_of(path, lines)
        if variant not in boots:
            if variant == "vanilla" and selftest_log is None:
                selftest_log = path
            continue
        boots[variant] += 1
        boot = boots[variant]
        runs = runs_rig(lines) or runs_reference(lines)
        for r in runs:
            key = (r["case"], variant)
            entry = grouped.setdefault(key, {
                "case": r["case"], "threads": r["threads"], "mutex": r["mutex"],
                "sleepMicros": r["sleepMicros"], "pages": r["pages"], "policy": variant, "runs": []})
            run = {k: v for k, v in r.items() if k not in ("case", "threads", "mutex", "sleepMicros", "pages")}
            run["boot"] = boot
            entry["runs"].append({k: v for k, v in run.items() if v is not None or k == "callsPerPage"})
        if qemu is None and variant == "legacy":
            cmd = cmdline_of(lines)
            if cmd:
                qemu = ("qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2G -smp 2 -nographic "
                        "-kernel bzImage.%s -initrd initramfs.cpio.gz -append \"%s\" -no-reboot"
                        % (meta.get("legacyImage", "instr"), cmd))
    cases = sorted(grouped.values(), key=lambda e: (case_key(e["case"]), e["policy"]))
    for e in cases:
        cpp = [r["callsPerPage"] for r in e["runs"] if r["outcome"] == "completes"]
        e["summary"] = {"completes": sum(r["outcome"] == "completes" for r in e["runs"]),
                        "livelock": sum(r["outcome"] == "livelock" for r in e["runs"]),
                        "callsPerPageMin": min(cpp) if cpp else None,
                        "callsPerPageMax": max(cpp) if cpp else None}
    doc = {
        "kernel": meta.get("kernel", "6.12.117"),
        "package": meta.get("package", "linux-source-6.12 6.12.117-1~deb12u1"),
        "date": date,
        "qemu": qemu,
        "host": meta.get("host"),
        "boots": min(b for b in boots.values()) if any(boots.values()) else 0,
        "source": meta.get("source"),
        "notes": meta.get("notes"),
        "cases": cases,
    }
    if selftest_log:
        tap = tap_of(read_lines(selftest_log))
        tot = totals_of(tap) or {}
        doc["selftests"] = {"pass": tot.get("pass"), "fail": tot.get("fail"), "skip": tot.get("skip"),
                            "log": args.tap_name or (args.tap if args.tap else None)}
        if args.tap and tap:
            with open(args.tap, "w") as f:
                f.write("\n".join(tap) + "\n")
    doc = {k: v for k, v in doc.items() if v is not None}
    write_json(args.out, doc)
    print(summary(doc))


def summary(doc):
    rows = ["%-8s %-8s %s" % ("case", "policy", "runs (outcome calls/page seconds)")]
    for e in doc["cases"]:
        parts = []
        for r in e["runs"]:
            if r["outcome"] == "completes":
                parts.append("%.2f/%.2fs" % (r["callsPerPage"], r["seconds"]))
            else:
                parts.append(r["outcome"].upper())
        rows.append("%-8s %-8s %s" % (e["case"], e["policy"], "  ".join(parts)))
    if "selftests" in doc:
        s = doc["selftests"]
        rows.append("hmm-tests: pass %s fail %s skip %s" % (s["pass"], s["fail"], s["skip"]))
    return "\n".join(rows)


def describe(entry):
    """One case's runs in a table cell: outcomes and the calls/page range."""
    if entry is None:
        return "-"
    runs = entry["runs"]
    done = [r["callsPerPage"] for r in runs if r["outcome"] == "completes"]
    hung = sum(r["outcome"] == "livelock" for r in runs)
    parts = []
    if done:
        lo, hi = min(done), max(done)
        rng = "%.2f" % lo if lo == hi else "%.2f-%.2f" % (lo, hi)
        parts.append(("completes %s" % rng) if not hung else ("%d completes (%s)" % (len(done), rng)))
    if hung:
        parts.append("LIVELOCK" if not done else "%d LIVELOCK" % hung)
    return ", ".join(parts)


def table(args):
    with open(args.data) as f:
        doc = json.load(f)
    ref = None
    if args.reference:
        with open(args.reference) as f:
            ref = json.load(f)
    idx = {(e["case"], e["policy"]): e for e in doc["cases"]}
    ridx = {(e["case"], e["policy"]): e for e in ref["cases"]} if ref else {}
    names = sorted({e["case"] for e in doc["cases"]}, key=case_key)
    head = "| case | legacy (%d boots, %s) | trylock | " % (doc["boots"], doc["date"])
    sep = "| --- | --- | --- |"
    if ref:
        head += "reference legacy (%s, %d boot) |" % (ref["date"], ref["boots"])
        sep += " --- |"
    print(head)
    print(sep)
    for n in names:
        row = "| %s | %s | %s |" % (n, describe(idx.get((n, "legacy"))), describe(idx.get((n, "trylock"))))
        if ref:
            row += " %s |" % describe(ridx.get((n, "legacy")))
        print(row)


# --------------------------------------------------------------- profile

def calibrations_of(lines):
    out, buf, inside = [], [], False
    for line in lines:
        if "RIG-CALIBRATION-BEGIN" in line:
            inside, buf = True, []
            continue
        if "RIG-CALIBRATION-END" in line:
            inside = False
            try:
                out.append(json.loads("\n".join(buf)))
            except json.JSONDecodeError as e:
                print("rigresults: unreadable calibration block: %s" % e, file=sys.stderr)
            continue
        if inside and not PRINTK.match(line):
            buf.append(line)
    return out


def profile(args):
    meta = load_meta(args.meta)
    boots = []
    for path in args.logs:
        boots.extend(calibrations_of(read_lines(path)))
    if not boots:
        sys.exit("rigresults: no calibration block in %s" % ", ".join(args.logs))
    first = boots[0]
    costs = {}
    spread = {}
    for key in first["costs"]:
        vals = [b["costs"][key] for b in boots if key in b["costs"]]
        med = statistics.median(vals)
        costs[key] = round(med, 1)
        spread[key] = (min(vals), max(vals))
    memcpy = []
    for i, row in enumerate(first["memcpy"]):
        vals = [b["memcpy"][i]["gbPerSecond"] for b in boots if i < len(b["memcpy"])]
        memcpy.append({"workingSetBytes": row["workingSetBytes"],
                       "gbPerSecond": round(statistics.median(vals), 3)})
    methods = {}
    for key, how in first["methods"].items():
        if key in spread:
            lo, hi = spread[key]
            how = "%s Median of %d boots (per-boot medians %.1f-%.1f ns)." % (how, len(boots), lo, hi)
        methods[key] = how
    doc = {
        "name": "qemu-tcg-2",
        "description": meta.get("description", "Linux 6.12.117 under QEMU TCG, 2 vCPUs (the kernel rig's guest)"),
        "measuredOn": meta.get("measuredOn"),
        "date": meta.get("date"),
        "tool": "Tools/kernel-rig/guest/calibrate.c (rig.sh calibrate, rigmode=calibrate), median of %d boots" % len(boots),
        "cpus": first.get("cpus", 2),
    }
    doc["costs"] = costs
    doc["memcpy"] = memcpy
    doc["scheduler"] = first["scheduler"]
    stalls = [b["stalls"] for b in boots if "stalls" in b]
    if stalls:
        # Each figure the median over the boots, as the costs.
        doc["stalls"] = {k: round(statistics.median([s[k] for s in stalls if k in s]), 1) for k in stalls[0]}
        if "stalls" in methods:
            methods["stalls"] += " Each figure the median of %d boots (per-boot: rate %s /s, p50 %s ns, p99 %s ns, max %s ns)." % (
                len(stalls), spread_of(stalls, "ratePerSecond"), spread_of(stalls, "p50Nanos"),
                spread_of(stalls, "p99Nanos"), spread_of(stalls, "maxNanos"))
    doc["methods"] = methods
    raws = [b["raw"] for b in boots if "raw" in b]
    if raws:
        doc["raw"] = {k: round(statistics.median([r[k] for r in raws if k in r]), 1) for k in raws[0]}
    doc["boots"] = len(boots)
    write_json(args.out, doc)
    for k in costs:
        lo, hi = spread[k]
        print("%-18s %10.1f ns   (boots %.1f-%.1f)" % (k, costs[k], lo, hi))
    if stalls:
        for k, v in doc["stalls"].items():
            print("stalls.%-17s %10.1f      (boots %s)" % (k, v, spread_of(stalls, k)))


def spread_of(rows, key):
    vals = [r[key] for r in rows if key in r]
    return "%.1f-%.1f" % (min(vals), max(vals)) if vals else "-"


# --------------------------------------------------------------- common

def load_meta(path):
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def write_json(path, doc):
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("livelock", help="livelock runs and hmm-tests totals as JSON")
    a.add_argument("--out", required=True)
    a.add_argument("--tap", help="write hmm-tests' TAP stream to this file")
    a.add_argument("--tap-name", help="the TAP file's name as written into the JSON (repository-relative)")
    a.add_argument("--selftest-log", help="the console log holding the selftest run (default: the first vanilla log)")
    a.add_argument("--meta", help="JSON with kernel, package, date, qemu, host, notes")
    a.add_argument("logs", nargs="+")
    a.set_defaults(func=livelock)
    t = sub.add_parser("table", help="a markdown table of a livelock.json (beside a reference one)")
    t.add_argument("data")
    t.add_argument("--reference")
    t.set_defaults(func=table)
    b = sub.add_parser("profile", help="the calibration blocks as a machine profile (medians over boots)")
    b.add_argument("--out", required=True)
    b.add_argument("--meta")
    b.add_argument("logs", nargs="+")
    b.set_defaults(func=profile)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

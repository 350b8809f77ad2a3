#!/usr/bin/env python3
"""Turn the kernel rig's QEMU console logs into the project's data files.

  rigresults.py livelock --out Data/kernel/livelock.json [--tap Data/kernel/hmm-tests.tap]
                [--selftest-log LOG] [--meta META.json] LOG...
  rigresults.py profile  --out Data/profiles/qemu-tcg-2.json [--meta META.json] LOG...
  rigresults.py stalls   [--profile Data/profiles/qemu-tcg-2.json] [--note TEXT] [--host-load idle|loaded] LOG...
  rigresults.py table    Data/kernel/livelock.json [--reference OTHER.json]
  rigresults.py probe    [--out Data/kernel/fault-path.json] [--profile Data/profiles/qemu-tcg-2.json]
                         [--meta META.json] [--brief] LOG...

Two log formats are read:
  * this rig's own (Tools/kernel-rig/guest/init): the guest prints
    "RIG: boot variant=... " once, one "RIG-RESULT {json}" line per livelock
    run, hmm-tests' console output between "RIG: ===== hmm-tests begin/end",
    and the calibration JSON between "RIG-CALIBRATION-BEGIN/END"; a probe
    boot (rigmode=probe) prints its kprobe events' ids (RIG-PROBE-EVENT),
    one probe's cost (RIG-PROBECOST), and per case the raw trace between
    "RIG-PROBE-TRACE-BEGIN/END" (pid, cpu, ns, "type: ID").
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


def tagged_json(lines, tag, warn=False):
    """The JSON objects of the lines that carry `tag` ("RIG-RESULT", ...);
    an unreadable one is skipped (with a warning on standard error if `warn`)."""
    for line in lines:
        i = line.find(tag + " ")
        if i < 0:
            continue
        try:
            yield json.loads(line[i + len(tag) + 1:])
        except json.JSONDecodeError as e:
            if warn:
                print("rigresults: unreadable %s line: %s" % (tag, e), file=sys.stderr)


def runs_rig(lines):
    """Runs from this rig's livelock program: one RIG-RESULT JSON line each."""
    runs = []
    for r in tagged_json(lines, "RIG-RESULT"):
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


STALL_KEYS = ("ratePerSecond", "meanNanos", "p50Nanos", "p90Nanos", "p99Nanos", "maxNanos", "thresholdNanos",
              "tickGapsPerSecond", "tickGapP50Nanos")


def stalls(args):
    """Amends a profile's `stalls` (and their method note) from calibration
    boots (their RIG-CALIBRATION blocks) or stall boots (rig.sh stalls: a
    RIG-STALLS line with the probe on one busy vCPU and on both), keeping
    every other key: the stall probe's figures follow the host's load from
    boot to boot (TCG), so they can be taken again alone."""
    both, one, ticks = [], [], set()
    for path in args.logs:
        lines = read_lines(path)
        got = [b["stalls"] for b in calibrations_of(lines) if "stalls" in b]
        for line in tagged_json(lines, "RIG-STALLS"):
            got.append(line["bothBusy"])
            one.append(line["oneBusy"])
        both.extend(got)
        m = re.search(r"righz=(\d+)", cmdline_of(lines) or "")
        if got and m:
            ticks.add(1e9 / int(m.group(1)))
    if not both:
        sys.exit("rigresults: no calibration block or RIG-STALLS line in %s" % ", ".join(args.logs))
    if len(ticks) > 1:
        sys.exit("rigresults: the boots ran kernels of different ticks (%s ns)" % sorted(ticks))

    def medians(rows):
        return {k: round(statistics.median([r[k] for r in rows if k in r]), 1) for k in STALL_KEYS if k in rows[0]}

    def spreads(rows):
        return "rate %s /s, p50 %s ns, p99 %s ns, max %s ns, tick gaps %s /s, their p50 %s ns" % (
            spread_of(rows, "ratePerSecond"), spread_of(rows, "p50Nanos"), spread_of(rows, "p99Nanos"),
            spread_of(rows, "maxNanos"), spread_of(rows, "tickGapsPerSecond"), spread_of(rows, "tickGapP50Nanos"))

    figures = medians(both)
    if ticks:
        figures["probeTickNanos"] = ticks.pop()
    if one:
        figures["oneBusy"] = medians(one)
    for k, v in figures.items():
        if k != "oneBusy":
            print("stalls.%-17s %10.1f      (boots %s)" % (k, v, spread_of(both, k)))
    for k, v in figures.get("oneBusy", {}).items():
        print("stalls.oneBusy.%-9s %10.1f      (boots %s)" % (k, v, spread_of(one, k)))
    # Recorded, not a profile key: how much of the stalled time both vCPUs
    # shared (the CPU model draws each CPU's stalls on its own).
    shared = [r for r in both if "sharedShare" in r]
    for k in ("stalledShare", "sharedShare", "longSharedShare"):
        if shared:
            print("(not in the profile) %-15s %6.3f      (boots %s)" % (
                k, statistics.median([r[k] for r in shared if k in r]), spread_of(shared, k, "%.3f")))
    if not args.profile:
        return
    with open(args.profile) as f:
        prof = json.load(f)
    prof["stalls"] = figures
    if args.host_load:
        prof["hostLoad"] = args.host_load
    how = ("On vCPU 0 and 1 (at the same time) one pinned thread each reads CLOCK_MONOTONIC in a loop, 5 rounds of 2 s, "
           "and notes every gap between two reads above thresholdNanos; the probe sets the guest's tick and its own "
           "preemptions apart (Docs/machine-profiles.md, \"Stalls\"; Sources/CSVMSupport/svm_stall_probe.h).")
    calibrated = [b for path in args.logs for b in calibrations_of(read_lines(path))]
    if calibrated:
        how = calibrated[0].get("methods", {}).get("stalls", how)
    note = "%s From %d boots of the rig's vanilla kernel (%s), the rest of the profile kept. Each figure the median of the boots (per-boot: %s)." % (
        how, len(both), args.note or "rig.sh calibrate", spreads(both))
    if one:
        note += (" oneBusy: the same probe on vCPU 0 alone with vCPU 1 idle (rig.sh stalls, rig-calibrate -S, in the same boots "
                 "before the two-vCPU probe): the stalls of a busy vCPU while the other idles (per-boot: %s)." % spreads(one))
    if shared:
        note += (" Both vCPUs busy, the share of a vCPU's stalled time in which the other was stalled too: %s (of the stalls "
                 "of at least the p99: %s), with each vCPU stalled %s of the time; the CPU model draws each CPU's stalls on "
                 "their own." % (spread_of(shared, "sharedShare", "%.3f"), spread_of(shared, "longSharedShare", "%.3f"),
                                 spread_of(shared, "stalledShare", "%.3f")))
    prof.setdefault("methods", {})["stalls"] = note
    write_json(args.profile, prof)
    print("wrote stalls into %s" % args.profile)


def spread_of(rows, key, fmt="%.1f"):
    vals = [r[key] for r in rows if key in r]
    return (fmt + "-" + fmt) % (min(vals), max(vals)) if vals else "-"


# --------------------------------------------------------------- timer wake-up

def timerwakes_of(lines):
    return list(tagged_json(lines, "RIG-TIMERWAKE", warn=True))


TIMER_POINTS = [("timer40us", 40000.0), ("timer400us", 400000.0)]


def timerwake(args):
    boots = []
    for path in args.logs:
        boots.extend(timerwakes_of(read_lines(path)))
    if not boots:
        sys.exit("rigresults: no RIG-TIMERWAKE line in %s" % ", ".join(args.logs))
    points, per_boot = [], []
    for key, idle in TIMER_POINTS:
        meds = [b[key]["p50"] for b in boots if key in b]
        points.append({"idleNanos": idle, "latencyNanos": float(statistics.median(meds))})
        per_boot.append("%d us: %s ns" % (idle / 1000, "/".join("%.0f" % m for m in meds)))
        p10 = min(b[key]["p10"] for b in boots if key in b)
        p90 = max(b[key]["p90"] for b in boots if key in b)
        per_boot[-1] += " (p10-p90 %.0f-%.0f)" % (p10, p90)
    futex = [m for b in boots for m in b.get("futexWakeMedians", [])]
    for p in points:
        print("timerWake idle %6.0f ns: %8.0f ns" % (p["idleNanos"], p["latencyNanos"]))
    if not args.profile:
        return
    with open(args.profile) as f:
        prof = json.load(f)
    prof["timerWake"] = {"points": points}
    prof.setdefault("methods", {})["timerWake"] = (
        "Measured in the rig's guest (rig.sh timerwake: rig-calibrate -W on the vanilla kernel, %d boots): a thread "
        "pinned to vCPU 1 (nothing else runs there; the other thread waits in pthread_join on vCPU 0) sets "
        "PR_SET_TIMERSLACK to 1 ns, so its hrtimer's range is one ns (as usleep_range(d, 2d)'s timer fires at 2d when "
        "no other interrupt comes first), sleeps 2 ms, then clock_nanosleep(TIMER_ABSTIME) until 40 us (or 400 us) "
        "after its clock read, and reads the clock when it runs: the overshoot is the hrtimer interrupt bringing the "
        "halted vCPU out of its idle loop, the wake-up and the switch back. 401 sleeps a length; each point the median "
        "of the boots' medians (boots, %s). In the same boots wake_latency() (the futex wake onto the idle vCPU) gave "
        "medians %.0f-%.0f ns." % (len(boots), "; ".join(per_boot), min(futex or [0]), max(futex or [0])))
    write_json(args.profile, prof)
    print("wrote timerWake into %s" % args.profile)


# --------------------------------------------------------------- probe

# The intervals of one device-private fault, each (name, from event, to
# event, what it is). "first"/"last" pick the event's first or last hit in
# the fault; the default is the first hit after the interval's start.
INTERVALS = [
    ("entryToReference", "fault", "devfault",
     "fault entry (lock_vma_under_rcu) to the page reference (dmirror_devmem_fault entry, right after do_swap_page's get_page): both passes"),
    ("firstPass", "fault", "hmfret",
     "pass 1 under the per-VMA lock: lock_vma_under_rcu to handle_mm_fault's return (VM_FAULT_RETRY)"),
    ("retry", "hmfret", "mmlock",
     "VM_FAULT_RETRY back in do_user_addr_fault to lock_mm_and_find_vma (pass 2 under mmap_read_lock)"),
    ("secondPassToReference", "mmlock", "devfault",
     "lock_mm_and_find_vma to the reference: the mmap lock, handle_mm_fault, do_swap_page, the PTE lock, get_page"),
    ("referenceToCollect", "devfault", "collect",
     "the reference to migrate_vma_collect_pmd's entry: migrate_to_ram, the driver (its mutex when -m 1), migrate_vma_setup, the notifier, walk_page_range"),
    ("collectToSetupReturn", "collect", "setupret",
     "migrate_vma_collect_pmd (the migration entry) and migrate_device_unmap (the reference check) to migrate_vma_setup's return"),
    ("copy", "copy", "copyret", "dmirror_devmem_fault_alloc_and_copy"),
    ("pages", "pages", "pagesret", "migrate_vma_pages"),
    ("finalize", "finalize", "finalizeret", "migrate_vma_finalize"),
    ("collectToFinalized", "collect", "finalizeret", "the collect to migrate_vma_finalize's return"),
    ("referenceToReturn", "devfault", "devfaultret", "migrate_to_ram as a whole (dmirror_devmem_fault entry to return)"),
    ("wholeFault", "fault", "hmfret:last",
     "lock_vma_under_rcu to the last handle_mm_fault return: the kernel's whole fault handling (exception entry and exit not included)"),
]

TRACE_LINE = re.compile(r"^(\d+) (\d+) (\d+) type: (\d+)\s*$")


def quantiles(vals):
    v = sorted(vals)
    if not v:
        return None
    def q(x):
        i = int(x * len(v))
        return v[min(i, len(v) - 1)]
    return {"p10": round(q(0.1)), "p50": round(statistics.median(v)), "p90": round(q(0.9)), "n": len(v)}


def probe_boot(path):
    """One probe boot's log: its cases' fault intervals and the probe cost."""
    lines = read_lines(path)
    ids, cost, cases, order = {}, {}, {}, []
    current, mode, trace_case, events = None, None, None, []
    for line in lines:
        m = re.match(r"^RIG-PROBE-EVENT (\S+) (\S+) ([pr]) (\d+)", line)
        if m:
            ids[int(m.group(4))] = m.group(1)
            continue
        m = re.match(r"^RIG-PROBECOST (\{.*\})", line)
        if m:
            d = json.loads(m.group(1))
            cost[d["label"]] = d
            continue
        m = re.match(r"^RIG: ----- case (\S+) (unprobed|probed|probed endpoints) -----", line)
        if m:
            current, mode = m.group(1), m.group(2)
            if current not in cases:
                cases[current] = {}
                order.append(current)
            continue
        m = re.match(r"^RIG-(TRACE|RESULT) (\{.*\})", line)
        if m and current:
            cases[current].setdefault(mode, {})[m.group(1).lower()] = json.loads(m.group(2))
            continue
        m = re.match(r"^RIG-PROBE-TRACE-BEGIN (\S+)( endpoints)?", line)
        if m:
            trace_case, trace_key, events = m.group(1), "endpointEvents" if m.group(2) else "events", []
            continue
        if line.startswith("RIG-PROBE-TRACE-END") and trace_case:
            cases.setdefault(trace_case, {})[trace_key] = events
            cases[trace_case].setdefault("overrun", []).append(line.split("overrun=", 1)[-1].strip())
            trace_case = None
            continue
        if trace_case:
            m = TRACE_LINE.match(line)
            if m and int(m.group(4)) in ids:
                events.append((int(m.group(1)), int(m.group(3)), ids[int(m.group(4))]))
    out = {"log": os.path.basename(path), "probeCost": cost, "cases": {}}
    for c in order:
        out["cases"][c] = probe_case(cases[c])
    return out


def device_faults(events):
    """Per thread, the events from one fault entry (lock_vma_under_rcu) to
    the next; the faults that reached the driver (a devfault event)."""
    by_pid = {}
    for pid, ts, name in sorted(events, key=lambda e: e[1]):
        by_pid.setdefault(pid, []).append((ts, name))
    faults = []
    for evs in by_pid.values():
        seg = None
        for ts, name in evs:
            if name == "fault":
                if seg:
                    faults.append(seg)
                seg = [(ts, name)]
            elif seg is not None:
                seg.append((ts, name))
        if seg:
            faults.append(seg)
    return [f for f in faults if any(n == "devfault" for _, n in f)]


def intervals_of(faults, step):
    """Each interval's quantiles over the faults, raw and minus `step` ns per
    probe step between its two events (two consecutive events = one step).
    One step for every kind of event: with every probe on, the whole read
    grows by about that step per probe hit (perProbeHitFromReadsNanos),
    kretprobe returns included, although the step between two returns alone
    is shorter (kretprobeStepNanos; the breakdown's `retry` comes out
    slightly negative for it)."""
    def cost(n):
        return step / 2
    raw, corrected = {}, {}
    for name, a, b, _ in INTERVALS:
        last = b.endswith(":last")
        b = b.split(":")[0]
        rv, cv = [], []
        for f in faults:
            ia = next((i for i, (_, n) in enumerate(f) if n == a), None)
            if ia is None:
                continue
            cands = [i for i, (_, n) in enumerate(f) if n == b and i > ia]
            if not cands:
                continue
            ib = cands[-1] if last else cands[0]
            d = f[ib][0] - f[ia][0]
            rv.append(d)
            cv.append(d - sum(cost(f[i][1]) + cost(f[i + 1][1]) for i in range(ia, ib)))
        raw[name] = quantiles(rv)
        corrected[name] = quantiles(cv)
    return raw, corrected


def step_distances(faults):
    """The distance from probe stepa to probe stepb in each fault that hit
    both: one entry probe's own cost."""
    out = []
    for f in faults:
        a = next((t for t, n in f if n == "stepa"), None)
        b = next((t for t, n in f if n == "stepb"), None)
        if a is not None and b is not None:
            out.append(b - a)
    return out


def probe_case(case):
    faults = device_faults(case.get("events", []))
    hits = statistics.median([len(f) for f in faults]) if faults else 0
    passes = [sum(1 for _, n in f if n == "hmf") for f in faults]
    # Without the step probes (below): one probe hit's cost, estimated by
    # the step from do_swap_page's return to handle_mm_fault's (two
    # kretprobe hits with only function epilogues between them), its median.
    steps = []
    for f in faults:
        for i in range(len(f) - 1):
            if f[i][1] == "swapret" and f[i + 1][1] == "hmfret":
                steps.append(f[i + 1][0] - f[i][0])
    step = statistics.median(steps) if steps else 0

    def read_p50(mode):
        t = case.get(mode, {}).get("trace")
        return t["leaderRead"]["p50"] if t else None
    unprobed, probed = read_p50("unprobed"), read_p50("probed")
    # What the probes added to the read's median, over a fault's hits (two
    # runs, so the host's load between them enters: for comparison only).
    per_hit = (probed - unprobed) / hits if unprobed and probed and hits else None
    efaults = device_faults(case.get("endpointEvents", []))
    # One entry probe's step, measured: stepa and stepb sit on two
    # consecutive push instructions of migrate_vma_collect_pmd (every probed
    # function's +0x4 is a push too), so their distance is one probe hit.
    kp = step_distances(efaults)
    kstep = statistics.median(kp) if kp else None
    # Each run its own step (the host's load moves between runs): the run
    # with every probe has stepa and stepb too.
    fp = step_distances(faults)
    fstep = statistics.median(fp) if fp else step
    estep = kstep if kstep is not None else step
    raw, corrected = intervals_of(faults, fstep)
    eraw, ecorrected = intervals_of(efaults, estep)
    step = estep
    res = {}
    for mode in ("unprobed", "probed", "probed endpoints"):
        r = case.get(mode, {}).get("result")
        t = case.get(mode, {}).get("trace")
        if r:
            res[mode] = {"outcome": r["outcome"], "callsPerPage": r.get("callsPerPage"),
                         "readNanos": {k: t["leaderRead"][k] for k in ("p10", "p50", "p90")} if t else None}
    keep = ("entryToReference", "referenceToCollect")
    return {"faultsTraced": len(faults), "endpointFaultsTraced": len(efaults), "probeHitsPerFault": hits,
            "passesPerFault": {"min": min(passes), "median": statistics.median(passes), "max": max(passes)} if passes else None,
            "probeStepNanos": round(step), "probeStepMeasured": kstep is not None,
            "allProbesStepNanos": round(fstep),
            "kretprobeStepNanos": round(statistics.median(steps)) if steps else None,
            "perProbeHitFromReadsNanos": round(per_hit) if per_hit is not None else None,
            "overrun": case.get("overrun"), "runs": res,
            "endpoints": {k: ecorrected[k] for k in keep}, "endpointsRaw": {k: eraw[k] for k in keep},
            "intervals": corrected, "rawIntervals": raw}


PROFILE_CASE = "1:0:0"


def probe(args):
    boots = [probe_boot(p) for p in args.logs]
    boots = [b for b in boots if b["cases"]]
    if not boots:
        sys.exit("rigresults: no probe trace in %s" % ", ".join(args.logs))

    def p50(d, k):
        return d[k]["p50"] if d.get(k) else None
    if args.brief:
        for b in boots:
            pc = b["probeCost"]
            print("  %s: getppid() ns a call: no probe %s, kprobe %s, kretprobe %s" % ((b["log"],) + tuple(
                pc.get(k, {}).get("p50", "-") for k in ("none", "kprobe", "kretprobe"))))
            for c, r in b["cases"].items():
                print("  %-6s %d faults, %s passes; probe step %s ns; endpoints p50: entry->ref %s, ref->collect %s; "
                      "all probes p50: entry->ref %s, ref->collect %s, whole %s; read %s" % (
                          c, r["faultsTraced"], r["passesPerFault"] and r["passesPerFault"]["median"], r["probeStepNanos"],
                          p50(r["endpoints"], "entryToReference"), p50(r["endpoints"], "referenceToCollect"),
                          p50(r["intervals"], "entryToReference"), p50(r["intervals"], "referenceToCollect"),
                          p50(r["intervals"], "wholeFault"),
                          (r["runs"].get("unprobed", {}).get("readNanos") or {}).get("p50")))
        return
    meta = load_meta(args.meta)
    cases = sorted({c for b in boots for c in b["cases"]})
    summary = {}
    for c in cases:
        rows = [b["cases"][c] for b in boots if c in b["cases"]]
        s = {}
        for group, names in (("endpoints", ("entryToReference", "referenceToCollect")),
                             ("intervals", [i[0] for i in INTERVALS])):
            g = {}
            for name in names:
                meds = [r[group][name]["p50"] for r in rows if r[group].get(name)]
                if meds:
                    g[name] = {"p50": round(statistics.median(meds)), "bootMedians": meds,
                               "bootP10P90": [[r[group][name]["p10"], r[group][name]["p90"]]
                                              for r in rows if r[group].get(name)],
                               "what": next(i[3] for i in INTERVALS if i[0] == name)}
            s[group] = g
        s["probeStepNanos"] = [r["probeStepNanos"] for r in rows]
        s["perProbeHitFromReadsNanos"] = [r["perProbeHitFromReadsNanos"] for r in rows]
        s["unprobedReadP50Nanos"] = [(r["runs"].get("unprobed", {}).get("readNanos") or {}).get("p50") for r in rows]
        s["passesPerFault"] = [r["passesPerFault"] for r in rows]
        summary[c] = s
    doc = {"kernel": "6.12.117 (legacy: + Tools/kernel-rig/patches/0001)", "date": meta.get("date"),
           "host": meta.get("host"), "qemu": meta.get("qemu"), "boots": len(boots),
           "method": ("kprobe events (tracefs, trace_clock mono, probe optimisation off: every probe an int3) on the "
                      "legacy kernel's device-private fault path; rig-livelock -t 1 (512 pages, one fault each), run "
                      "without probes, with every probe (the breakdown: intervals) and with only the three that end "
                      "the two measured intervals (endpoints: one probe step inside each). A probe step (two "
                      "consecutive events: the end of one handler and the start of the next) is measured in the same "
                      "run: two more probes (stepa, stepb) sit on two consecutive push instructions of "
                      "migrate_vma_collect_pmd (every probed function's +0x4 is a push as well), and the median of "
                      "their distance is the step; each interval is its raw time minus that step per step in it. Per "
                      "boot the median over the faults; the figure is the median of the boots' medians."),
           "getppidProbeCost": [b["probeCost"] for b in boots],
           "summary": summary, "bootDetails": boots}
    if args.out:
        write_json(args.out, doc)
    for c in cases:
        s = summary[c]
        print("case %s (%d boots): probe step %s ns, per hit from reads %s ns, unprobed read p50 %s ns, passes %s" % (
            c, len(s["probeStepNanos"]), s["probeStepNanos"], s["perProbeHitFromReadsNanos"], s["unprobedReadP50Nanos"],
            [p and p["median"] for p in s["passesPerFault"]]))
        for group in ("endpoints", "intervals"):
            for name, v in s[group].items():
                print("  %-9s %-22s p50 %7d ns   boots %s  p10-p90 %s" % (
                    group[:9], name, v["p50"], v["bootMedians"], v["bootP10P90"]))
    if args.profile:
        s = summary.get(PROFILE_CASE)
        if not s:
            sys.exit("rigresults: no %s case to put into %s" % (PROFILE_CASE, args.profile))
        e = s["endpoints"]
        with open(args.profile) as f:
            prof = json.load(f)
        n = len(e["entryToReference"]["bootMedians"])
        prof["deviceFault"] = {"entryToReferenceNanos": float(e["entryToReference"]["p50"]),
                               "referenceToCollectNanos": float(e["referenceToCollect"]["p50"])}
        prof.setdefault("methods", {})["deviceFault"] = (
            "Measured in the rig's guest (rig.sh probe: the legacy kernel, rig-livelock -t 1 -m 0 -d 0, 512 pages, "
            "%d boots; Data/kernel/fault-path.json) with kprobe events on three points only: entryToReferenceNanos "
            "from lock_vma_under_rcu's entry (the fault's first probed point, after the exception entry) to "
            "dmirror_devmem_fault's entry (right after do_swap_page's get_page), both passes of 6.12's device-private "
            "fault (the per-VMA lock's VM_FAULT_RETRY, then mmap_read_lock); referenceToCollectNanos from there to "
            "migrate_vma_collect_pmd's entry (migrate_to_ram, migrate_vma_setup, the mmu notifier, walk_page_range). "
            "Per fault minus one probe step (the median distance of two probes on consecutive instructions in the same "
            "run, %s ns in the boots); "
            "each the median of the boots' medians (boots: %s ns; %s ns)."
            % (n, "/".join(str(h) for h in s["probeStepNanos"]),
               "/".join(str(v) for v in e["entryToReference"]["bootMedians"]),
               "/".join(str(v) for v in e["referenceToCollect"]["bootMedians"])))
        write_json(args.profile, prof)
        print("wrote deviceFault into %s: %s" % (args.profile, prof["deviceFault"]))


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


# --------------------------------------------------------------- sched trace

SCHED_LINE = re.compile(r"^\s*(\S+)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)$")


def schedtrace(args):
    """The scheduler's side of a contended case from a schedtrace boot
    (rig.sh boot legacy schedtrace rigprobecases=T:M:D): where wake-ups of
    the rig's threads went (the CPU the wakee last ran on, or the other),
    with each CPU busy or idle as the trace shows it when the wake-up is
    logged; the rig threads' preemptions (a switch away from one still
    runnable); and the driver calls (migrate_vma_setup) by the same thread
    as the call before. From trace time --after on (the stalled page)."""
    lines = read_lines(args.log)
    begin = [i for i, l in enumerate(lines) if l.startswith("RIG-SCHED-TRACE-BEGIN")]
    if not begin:
        sys.exit("rigresults: no RIG-SCHED-TRACE-BEGIN in %s" % args.log)
    events = []
    for line in lines[begin[0] + 1:]:
        if line.startswith("RIG-SCHED-TRACE-END"):
            break
        m = SCHED_LINE.match(line)
        if m:
            comm, pid, cpu, t, name, rest = m.groups()
            events.append((float(t), int(cpu), int(pid), comm, name, rest))
    events.sort(key=lambda e: e[0])
    running, last = {}, {}
    wakes, preempted, setups = {}, 0, []
    for t, cpu, pid, comm, name, rest in events:
        if name == "sched_switch":
            nxt = int(re.search(r"next_pid=(\d+)", rest).group(1))
            if t >= args.after and "prev_comm=rig-livelock" in rest and re.search(r"prev_state=R", rest):
                preempted += 1
            running[cpu] = nxt
            if nxt:
                last[nxt] = cpu
        elif name == "sched_wakeup" and "comm=rig-livelock" in rest and t >= args.after:
            wakee = int(re.search(r" pid=(\d+)", rest).group(1))
            target = int(re.search(r"target_cpu=(\d+)", rest).group(1))
            if wakee not in last:
                continue
            lc = last[wakee]
            others = [c for c in running if c != lc]
            key = ("to the last CPU" if target == lc else "to another CPU",
                   "last CPU busy" if running.get(lc, 0) not in (0, wakee) else "last CPU idle",
                   "another CPU idle" if any(running.get(c, 0) == 0 for c in others) else "no other CPU idle")
            wakes[key] = wakes.get(key, 0) + 1
        elif name == "setup" and t >= args.after:
            setups.append(pid)
    same = sum(1 for a, b in zip(setups, setups[1:]) if a == b)
    print("wake-ups of rig threads from %.6f s (the CPU state when the wake-up is logged):" % args.after)
    for key in sorted(wakes):
        print("  %6d  %s, %s, %s" % ((wakes[key],) + key))
    moved = sum(v for k, v in wakes.items() if k[0] == "to another CPU" and k[1] == "last CPU busy")
    stayed = sum(v for k, v in wakes.items() if k[0] == "to the last CPU" and k[1] == "last CPU busy"
                 and k[2] == "another CPU idle")
    print("last CPU busy and another idle: %d went to another CPU, %d stayed" % (moved, stayed))
    print("preemptions of rig threads: %d; driver calls: %d, by the same thread as the call before: %d (%.2f)" % (
        preempted, len(setups), same, same / len(setups) if setups else 0))

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
    w = sub.add_parser("timerwake", help="the timer wake-up latency (rig-calibrate -W boots) into a profile (timerWake)")
    w.add_argument("--profile", help="put the measured points into this machine profile (timerWake)")
    w.add_argument("logs", nargs="+")
    w.set_defaults(func=timerwake)
    st = sub.add_parser("stalls", help="the stall probe of calibration boots into a profile (stalls), the rest kept")
    st.add_argument("--profile", help="put the boots' stall figures into this machine profile (stalls)")
    st.add_argument("--note", help="how the boots ran (the host's load), for the method note")
    st.add_argument("--host-load", help="the profile's hostLoad (idle, loaded): svmemu fidelity compares it with the kernel's boots of that load")
    st.add_argument("logs", nargs="+")
    st.set_defaults(func=stalls)
    r = sub.add_parser("probe", help="kprobe traces of the device-private fault path as intervals")
    r.add_argument("--out", help="write the intervals as JSON (Data/kernel/fault-path.json)")
    r.add_argument("--profile", help="put the two measured costs into this machine profile (deviceFault)")
    r.add_argument("--meta")
    r.add_argument("--brief", action="store_true", help="a few lines per boot, nothing written")
    r.add_argument("logs", nargs="+")
    r.set_defaults(func=probe)
    sc = sub.add_parser("schedtrace", help="wake-up placement and preemptions in a schedtrace boot's log")
    sc.add_argument("--after", type=float, default=0.0, help="trace time (s) to start from, e.g. the stalled page's start")
    sc.add_argument("log")
    sc.set_defaults(func=schedtrace)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

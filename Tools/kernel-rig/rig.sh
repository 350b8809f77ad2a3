#!/bin/bash
# The project's real-kernel rig: Debian's linux-source-6.12 (pinned to
# 6.12.117-1~deb12u1) with lib/test_hmm built in, three kernels (vanilla; the
# test_hmm knob patch = the legacy fault path; + the trylock backport), booted
# under QEMU TCG with 2 vCPUs, running the kernel's hmm-tests, the livelock
# cases and a calibration program. See Tools/kernel-rig/README.md.
#
# usage: Tools/kernel-rig/rig.sh COMMAND
#   packages   check the apt packages, install the missing ones
#   fetch      download the pinned linux-source .deb, extract it (no system change)
#   kernels    build bzImage.vanilla, bzImage.legacy, bzImage.trylock (cached)
#   guest      build the static guest programs and the initramfs (cached)
#   selftest   boot vanilla, run hmm-tests, keep the TAP log
#   livelock   boot legacy and trylock BOOTS times each, run the cases
#   calibrate  boot vanilla CALIBRATE_BOOTS times, run the calibration program
#   probe      boot legacy PROBE_BOOTS times: kprobe events on the device-private
#              fault path of single-thread cases (PROBE_CASES), and one probe's cost
#   timerwake  boot vanilla TIMERWAKE_BOOTS times (default 5): the timer wake-up
#              latency of an idle vCPU (rig-calibrate -W; rigresults.py timerwake)
#   stalls     boot vanilla STALL_BOOTS times (default 5): the stall probe alone, with
#              one vCPU busy and with both (rig-calibrate -S; rigresults.py stalls)
#   results    turn a run's logs into the data files (RUN_ID, default the latest run)
#   check      all of the above in order (what `make kernel-check` runs)
#   boot VARIANT MODE [kernel args]   one boot by hand (MODE: selftest|livelock|calibrate|probe|shell)
#
# env: BOOTS (livelock boots per kernel, default 3), CALIBRATE_BOOTS (default 5),
#      CASES (default: the 12 reference cases and 5 more), WATCHDOG (seconds without page
#      progress that declare a livelock, default 30), RUN_ID (the logs' folder
#      under .build-kernel/logs, default a new timestamp),
#      PAGES (default 512), TRACE (non-empty: rig-livelock -T, the barrier-exit
#      and read timing as RIG-TRACE lines), JOBS (make -j, default nproc), RIG_DIR (scratch,
#      default <repo>/.build-kernel), BOOT_TIMEOUT (seconds, default 1200),
#      PROBE_BOOTS (default 3), PROBE_CASES (default 1:0:0,1:1:0), VCPUS (the guest's
#      vCPUs, default 2: the reference's; 1 isolates the one-CPU hand-over of the driver
#      lock, Docs/fidelity.md).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RIG_DIR=${RIG_DIR:-$REPO/.build-kernel}
KVER=6.12.117
PKG_NAME=linux-source-6.12
PKG_VERSION=6.12.117-1~deb12u1
SRC=$RIG_DIR/linux-source-6.12
OUT=$RIG_DIR/out
LOGS=$RIG_DIR/logs
BOOTS=${BOOTS:-3}
CALIBRATE_BOOTS=${CALIBRATE_BOOTS:-5}
PROBE_BOOTS=${PROBE_BOOTS:-3}
TIMERWAKE_BOOTS=${TIMERWAKE_BOOTS:-5}
STALL_BOOTS=${STALL_BOOTS:-5}
PROBE_CASES=${PROBE_CASES:-1:0:0,1:1:0}
WATCHDOG=${WATCHDOG:-30}
PAGES=${PAGES:-512}
JOBS=${JOBS:-$(nproc)}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-1200}
# The 12 cases of the reference RESULTS.md: threads:fault_mutex:fault_delay_us.
CASES=${CASES:-1:0:0,8:0:0,8:0:50,8:0:200,8:1:0,8:1:5,8:1:10,8:1:20,8:1:50,8:1:200,2:1:50,4:1:50,2:1:200,4:0:200,4:1:20,4:1:200,16:1:50}
VCPUS=${VCPUS:-2}
QEMU=(qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$VCPUS" -m 2G -nographic -no-reboot)
APT_PACKAGES=(qemu-system-x86 busybox-static build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils)

say() { echo "kernel-rig: $*"; }
die() { echo "kernel-rig: error: $*" >&2; exit 1; }

cmd_packages() {
	local missing=()
	for p in "${APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		say "apt packages present: ${APT_PACKAGES[*]}"
		return
	fi
	say "installing missing apt packages: ${missing[*]}"
	local sudo=""
	[ "$(id -u)" = 0 ] || sudo=sudo
	$sudo apt-get update -qq
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
		|| die "apt-get install ${missing[*]} failed (run it by hand to see why)"
}

# The pinned source: `apt-get download` into a cache, `dpkg-deb -x` into the
# scratch folder. The installed linux-source package (if any) is not touched.
cmd_fetch() {
	if [ -f "$SRC/.rig-version" ] && [ "$(cat "$SRC/.rig-version")" = "$PKG_VERSION" ]; then
		say "source $PKG_NAME $PKG_VERSION already in $SRC"
		return
	fi
	mkdir -p "$RIG_DIR/cache"
	local deb
	deb=$(ls "$RIG_DIR/cache/${PKG_NAME}_${PKG_VERSION/\~/%7e}_all.deb" "$RIG_DIR/cache/${PKG_NAME}_${PKG_VERSION}_all.deb" 2>/dev/null | head -1 || true)
	if [ -z "$deb" ]; then
		say "downloading $PKG_NAME=$PKG_VERSION (about 150 MB)"
		(cd "$RIG_DIR/cache" && apt-get download "$PKG_NAME=$PKG_VERSION") \
			|| ( say "retrying after apt-get update"; $( [ "$(id -u)" = 0 ] || echo sudo ) apt-get update -qq; \
			     cd "$RIG_DIR/cache" && apt-get download "$PKG_NAME=$PKG_VERSION" ) \
			|| die "apt-get download $PKG_NAME=$PKG_VERSION failed: run 'apt-get update' (the version must be listed by 'apt-cache policy $PKG_NAME')"
		deb=$(ls "$RIG_DIR"/cache/${PKG_NAME}_*"${PKG_VERSION#*:}"*_all.deb | head -1)
	fi
	say "extracting $deb"
	rm -rf "$RIG_DIR/pkg" "$SRC"
	dpkg-deb -x "$deb" "$RIG_DIR/pkg"
	tar xf "$RIG_DIR/pkg/usr/src/$PKG_NAME.tar.xz" -C "$RIG_DIR"
	rm -rf "$RIG_DIR/pkg"
	local v
	v=$(make -s -C "$SRC" kernelversion)
	[ "$v" = "$KVER" ] || die "the source says $v, expected $KVER"
	echo "$PKG_VERSION" > "$SRC/.rig-version"
	say "source $v in $SRC"
}

PATCH_KNOB=$HERE/patches/0001-test_hmm-fault-mutex-delay-and-counters.patch
PATCH_TRYLOCK=$HERE/patches/0002-backport-mm-migrate-trylock-device-page-in-do_swap_page.patch

# Bring the source tree to a patch level (0 = pristine, 1 = knob, 2 = knob +
# trylock); the level applied is kept in $SRC/.rig-patches.
patch_level() {
	local want=$1 have=0
	[ -f "$SRC/.rig-patches" ] && have=$(cat "$SRC/.rig-patches")
	local patches=("$PATCH_KNOB" "$PATCH_TRYLOCK")
	while [ "$have" -gt "$want" ]; do
		patch -s -R -p1 -d "$SRC" < "${patches[$((have - 1))]}" || die "cannot revert ${patches[$((have - 1))]}"
		have=$((have - 1)); echo $have > "$SRC/.rig-patches"
	done
	while [ "$have" -lt "$want" ]; do
		patch -s -p1 -d "$SRC" < "${patches[$have]}" || die "cannot apply ${patches[$have]}"
		have=$((have + 1)); echo $have > "$SRC/.rig-patches"
	done
}

configure() {
	[ -f "$SRC/.config" ] && [ "$SRC/.config" -nt "$HERE/kernel.config" ] && return
	say "configuring (defconfig + kvm_guest.config + Tools/kernel-rig/kernel.config)"
	make -s -C "$SRC" defconfig
	make -s -C "$SRC" kvm_guest.config
	(cd "$SRC" && scripts/kconfig/merge_config.sh -m .config "$HERE/kernel.config" >/dev/null)
	make -s -C "$SRC" olddefconfig
	local opt
	for opt in TEST_HMM DEVICE_PRIVATE HMM_MIRROR DEBUG_FS; do
		grep -q "^CONFIG_$opt=y" "$SRC/.config" || die "CONFIG_$opt did not stay on in .config"
	done
	touch "$SRC/.config"
}

build_variant() {	# build_variant NAME LEVEL
	local name=$1 level=$2 image=$OUT/bzImage.$1 stamp
	stamp=$(cat "$HERE/kernel.config" $( [ "$level" -ge 1 ] && echo "$PATCH_KNOB" ) \
		$( [ "$level" -ge 2 ] && echo "$PATCH_TRYLOCK" ) | md5sum | cut -c1-16)
	if [ -f "$image" ] && [ "$(cat "$image.stamp" 2>/dev/null)" = "$stamp" ]; then
		say "bzImage.$name is built (cached)"
		return
	fi
	patch_level "$level"
	say "building bzImage.$name (nice, -j$JOBS; the first build takes 8-30 min here)"
	local t0=$SECONDS
	nice -n 10 make -s -C "$SRC" -j"$JOBS" bzImage > "$RIG_DIR/build-$name.log" 2>&1 \
		|| { tail -30 "$RIG_DIR/build-$name.log"; die "bzImage.$name failed (log: $RIG_DIR/build-$name.log)"; }
	mkdir -p "$OUT"
	cp "$SRC/arch/x86/boot/bzImage" "$image"
	echo "$stamp" > "$image.stamp"
	say "bzImage.$name built in $((SECONDS - t0)) s"
}

cmd_kernels() {
	cmd_fetch
	configure
	local only=${1:-all}
	[ "$only" = all ] || [ "$only" = vanilla ] && build_variant vanilla 0
	[ "$only" = all ] || [ "$only" = legacy ] && build_variant legacy 1
	[ "$only" = all ] || [ "$only" = trylock ] && build_variant trylock 2
	patch_level 0
	cp "$SRC/.config" "$OUT/config"
	return 0
}

cmd_guest() {
	cmd_fetch
	mkdir -p "$OUT/bin"
	local cflags=(-static -O2 -Wall -pthread)
	local sel=$SRC/tools/testing/selftests/mm
	# hmm-tests as the kernel's selftests build it (tools/testing/selftests/mm),
	# static so the initramfs needs no libc.
	if [ ! -x "$OUT/bin/hmm-tests" ] || [ "$sel/hmm-tests.c" -nt "$OUT/bin/hmm-tests" ]; then
		say "building hmm-tests (static) from $sel"
		gcc "${cflags[@]}" -U_FORTIFY_SOURCE -no-pie -I "$SRC" -isystem "$SRC/tools/include/uapi" \
			"$sel/hmm-tests.c" "$sel/vm_util.c" "$sel/thp_settings.c" -lrt -lm -o "$OUT/bin/hmm-tests"
	fi
	for prog in livelock calibrate probecost; do
		if [ ! -x "$OUT/bin/rig-$prog" ] || [ "$HERE/guest/$prog.c" -nt "$OUT/bin/rig-$prog" ] \
			|| [ "$REPO/Sources/CSVMSupport/svm_stall_probe.h" -nt "$OUT/bin/rig-$prog" ]; then
			say "building rig-$prog (static)"
			gcc "${cflags[@]}" -I "$SRC" -I "$REPO/Sources/CSVMSupport" "$HERE/guest/$prog.c" -lm -o "$OUT/bin/rig-$prog"
		fi
	done
	local busybox
	busybox=$(dpkg -L busybox-static | grep -m1 '/bin/busybox$') || die "busybox-static is not installed"
	file -L "$busybox" 2>/dev/null | grep -q "statically linked" || say "warning: $busybox does not look static"
	local root=$RIG_DIR/initramfs-root img=$OUT/initramfs.cpio.gz
	if [ -f "$img" ] && [ "$img" -nt "$HERE/guest/init" ] && [ "$img" -nt "$OUT/bin/rig-livelock" ] \
		&& [ "$img" -nt "$OUT/bin/rig-calibrate" ] && [ "$img" -nt "$OUT/bin/rig-probecost" ] \
		&& [ "$img" -nt "$OUT/bin/hmm-tests" ]; then
		say "initramfs is built (cached)"
		return
	fi
	rm -rf "$root"
	mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc}
	cp "$busybox" "$root/bin/busybox"
	ln -s busybox "$root/bin/sh"
	cp "$OUT/bin/hmm-tests" "$OUT/bin/rig-livelock" "$OUT/bin/rig-calibrate" "$OUT/bin/rig-probecost" "$root/bin/"
	install -m 755 "$HERE/guest/init" "$root/init"
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$img"
	say "initramfs: $img ($(du -k "$img" | cut -f1) KiB)"
}

# boot VARIANT MODE [args]: one QEMU boot; the console goes to a log under $LOGS.
LAST_LOG=""
boot() {
	local variant=$1 mode=$2
	shift 2
	local image=$OUT/bzImage.$variant
	[ -f "$image" ] || die "no $image (run: $0 kernels)"
	[ -f "$OUT/initramfs.cpio.gz" ] || die "no initramfs (run: $0 guest)"
	mkdir -p "$LOGS/$RUN_ID"
	local n=1
	while [ -e "$LOGS/$RUN_ID/$variant-$mode-$n.log" ]; do n=$((n + 1)); done
	LAST_LOG=$LOGS/$RUN_ID/$variant-$mode-$n.log
	local append="console=ttyS0 panic=-1 hugepages=32 transparent_hugepage=madvise rigmode=$mode rigvariant=$variant $*"
	local cmd=("${QEMU[@]}" -kernel "$image" -initrd "$OUT/initramfs.cpio.gz" -append "$append")
	# The command as a shell would take it (the -append value quoted).
	echo "${QEMU[*]} -kernel ${image#$REPO/} -initrd ${OUT#$REPO/}/initramfs.cpio.gz -append \"$append\"" > "$LAST_LOG.cmd"
	say "boot $variant $mode #$n ($(date +%H:%M:%S)) -> ${LAST_LOG#$REPO/}"
	local t0=$SECONDS rc attempt
	# A kernel that dies before the init runs is booted again (twice at most):
	# multi-threaded TCG has been seen, about once in 30 boots, to hit an int3
	# Oops while the kernel patches its own text early in boot. The failed
	# console log is kept as *.failed-N. A boot whose init ran is never retried.
	for attempt in 1 2 3; do
		rc=0
		timeout "$BOOT_TIMEOUT" "${cmd[@]}" > "$LAST_LOG" 2>&1 < /dev/null || rc=$?
		grep -aq "^RIG: boot variant=" "$LAST_LOG" && break
		mv "$LAST_LOG" "$LAST_LOG.failed-$attempt"
		say "warning: the kernel died before init (qemu rc=$rc; log kept as ${LAST_LOG#$REPO/}.failed-$attempt)"
		[ $attempt -lt 3 ] && say "booting again" || { : > "$LAST_LOG"; }
	done
	grep -aq "RIG: done" "$LAST_LOG" || say "warning: boot did not finish (qemu rc=$rc after $((SECONDS - t0)) s); see $LAST_LOG"
	say "boot took $((SECONDS - t0)) s"
}

RUN_ID_GIVEN=${RUN_ID:+yes}
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}

cmd_selftest() {
	boot vanilla selftest
	grep -a "^# Totals" "$LAST_LOG" | tr -d '\r' || true
}

cmd_livelock() {
	local i
	for i in $(seq 1 "$BOOTS"); do
		for v in legacy trylock; do
			boot "$v" livelock "rigcases=$CASES rigpages=$PAGES rigwatchdog=$WATCHDOG${TRACE:+ rigtrace=1}"
			grep -a "RIG-RESULT" "$LAST_LOG" | tr -d '\r' | sed 's/^.*RIG-RESULT /  /' \
				| python3 -c 'import sys,json
for l in sys.stdin:
    r=json.loads(l); c="%d:%d:%d"%(r["threads"],r["mutex"],r["sleepMicros"])
    print("  %-8s %s" % (c, "%.2f calls/page %.2f s" % (r["callsPerPage"], r["seconds"]) if r["outcome"]=="completes" else r["outcome"].upper()))'
		done
	done
}

cmd_calibrate() {
	local i
	local hz
	hz=$(sed -n 's/^CONFIG_HZ=//p' "$OUT/config" 2>/dev/null || true)
	for i in $(seq 1 "$CALIBRATE_BOOTS"); do
		boot vanilla calibrate ${hz:+righz=$hz}
		tr -d '\r' < "$LAST_LOG" | sed -n '/"costs"/,/}/p' | sed '1d;$d'
	done
}

# The timer wake-up latency of an idle vCPU (rig-calibrate -W, one RIG-TIMERWAKE
# line a boot); rigresults.py timerwake puts it into the profile (timerWake).
cmd_timerwake() {
	local i
	for i in $(seq 1 "$TIMERWAKE_BOOTS"); do
		boot vanilla calibrate rigcalibrate=-W
		grep -a "RIG-TIMERWAKE" "$LAST_LOG" | tr -d '\r' || say "warning: no RIG-TIMERWAKE line in $LAST_LOG"
	done
}

# The stall probe alone (rig-calibrate -S, one RIG-STALLS line a boot): vCPU 0
# spinning with vCPU 1 idle, then both; rigresults.py stalls puts them into a
# profile (stalls, stalls.oneBusy).
cmd_stalls() {
	local i
	local hz
	hz=$(sed -n 's/^CONFIG_HZ=//p' "$OUT/config" 2>/dev/null || true)
	for i in $(seq 1 "$STALL_BOOTS"); do
		boot vanilla calibrate rigcalibrate=-S ${hz:+righz=$hz}
		grep -a "RIG-STALLS" "$LAST_LOG" | tr -d '\r' || say "warning: no RIG-STALLS line in $LAST_LOG"
	done
}

# kprobe events on the legacy kernel's device-private fault path (guest/init,
# rigmode=probe); rigresults.py probe turns the traces into intervals.
cmd_probe() {
	local i
	for i in $(seq 1 "$PROBE_BOOTS"); do
		boot legacy probe "rigprobecases=$PROBE_CASES rigpages=$PAGES rigwatchdog=$WATCHDOG"
		python3 "$HERE/rigresults.py" probe --brief "$LAST_LOG" || say "warning: no probe trace in $LAST_LOG"
	done
}

host_description() {
	local model
	model=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
	echo "$model, $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576+0.5}' /proc/meminfo)"
}

cmd_results() {
	if [ -z "$RUN_ID_GIVEN" ] && [ ! -d "$LOGS/$RUN_ID" ]; then
		RUN_ID=$(ls -1 "$LOGS" 2>/dev/null | grep -E '^[0-9]{8}-[0-9]{6}$' | tail -1 || true)
		[ -n "$RUN_ID" ] || die "no run under $LOGS"
		say "results of the latest run, $RUN_ID"
	fi
	local dir=$LOGS/$RUN_ID
	[ -d "$dir" ] || die "no logs in $dir (set RUN_ID to a folder under $LOGS)"
	local qemu_cmd date meta=$dir/meta.json
	qemu_cmd=$(cat "$(ls "$dir"/legacy-livelock-*.log.cmd "$dir"/legacy-probe-*.log.cmd 2>/dev/null | head -1)" 2>/dev/null || true)
	qemu_cmd=${qemu_cmd//$REPO\//}
	date=$(date -r "$dir" +%Y-%m-%d)
	python3 - "$meta" "$qemu_cmd" "$date" "$(host_description)" "$(qemu-system-x86_64 --version | head -1)" <<'PY'
import json, sys
path, qemu, date, host, qver = sys.argv[1:6]
json.dump({"kernel": "6.12.117", "package": "linux-source-6.12 6.12.117-1~deb12u1", "date": date,
           "qemu": qemu.strip(), "host": host,
           "source": "Tools/kernel-rig (make kernel-check), " + qver,
           "notes": "legacy = 6.12.117 + the test_hmm knob patch (Tools/kernel-rig/patches/0001); trylock = + the backport of upstream 1afaeb8293c9 (patches/0002). Each boot runs every case once. A livelock run has callsPerPage null, seconds = the watchdog's limit, and callsPerSecond = migrate_to_ram calls per second while no page progressed.",
           "measuredOn": host, "description": "Linux 6.12.117 (Debian linux-source-6.12) under QEMU TCG, 2 vCPUs, 2 GiB, on " + host},
          open(path, "w"))
PY
	local sel
	sel=$(ls "$dir"/vanilla-selftest-*.log 2>/dev/null | head -1 || true)
	if ls "$dir"/legacy-livelock-*.log >/dev/null 2>&1; then
		python3 "$HERE/rigresults.py" livelock --meta "$meta" --out "$REPO/Data/kernel/livelock.json" \
			${sel:+--selftest-log "$sel" --tap "$REPO/Data/kernel/hmm-tests.tap" --tap-name Data/kernel/hmm-tests.tap} \
			"$dir"/legacy-livelock-*.log "$dir"/trylock-livelock-*.log
		say "wrote Data/kernel/livelock.json${sel:+ and Data/kernel/hmm-tests.tap}"
	fi
	if ls "$dir"/vanilla-calibrate-*.log >/dev/null 2>&1; then
		python3 "$HERE/rigresults.py" profile --meta "$meta" --out "$REPO/Data/profiles/qemu-tcg-2.json" \
			"$dir"/vanilla-calibrate-*.log
		say "wrote Data/profiles/qemu-tcg-2.json"
	fi
	# After the profile (which it amends): the device-private fault path's
	# two measured spans go into the profile's deviceFault.
	if ls "$dir"/legacy-probe-*.log >/dev/null 2>&1; then
		python3 "$HERE/rigresults.py" probe --meta "$meta" --out "$REPO/Data/kernel/fault-path.json" \
			--profile "$REPO/Data/profiles/qemu-tcg-2.json" "$dir"/legacy-probe-*.log
		say "wrote Data/kernel/fault-path.json and deviceFault in Data/profiles/qemu-tcg-2.json"
	fi
}

cmd_check() {
	local t0=$SECONDS
	cmd_packages
	cmd_fetch
	cmd_kernels
	cmd_guest
	say "run $RUN_ID: $BOOTS boots per kernel, cases $CASES"
	cmd_selftest
	cmd_livelock
	cmd_calibrate
	cmd_probe
	cmd_results
	say "done in $(( (SECONDS - t0) / 60 )) min; logs in ${LOGS#$REPO/}/$RUN_ID"
}

# The whole file is read before anything runs (main is called on the last
# line), so editing rig.sh during a long run does not derail that run.
main() {
case "${1:-}" in
packages) cmd_packages ;;
fetch) cmd_fetch ;;
kernels) shift; cmd_kernels "$@" ;;
guest) cmd_guest ;;
selftest) cmd_selftest ;;
livelock) cmd_livelock ;;
calibrate) cmd_calibrate ;;
probe) cmd_probe ;;
timerwake) cmd_timerwake ;;
stalls) cmd_stalls ;;
results) cmd_results ;;
check) cmd_check ;;
boot) shift; [ $# -ge 2 ] || die "usage: $0 boot VARIANT MODE [kernel args]"; boot "$@"; echo "log: $LAST_LOG" ;;
*) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
}
main "$@"; exit $?

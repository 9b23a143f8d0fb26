#!/usr/bin/env bash
# A real SLURM cluster on this machine (two nodes by default, one with LOCAL_SLURM_NODES=1), for CI and for trying the launchers on a workstation.
#
#   eval "$(sudo slurm/local-cluster.sh start)"   # prints `export SLURM_CONF=...` lines to eval
#   sinfo; sbatch ...; squeue
#   sudo slurm/local-cluster.sh stop
#   slurm/local-cluster.sh env                    # the export lines again (cluster already running)
#   slurm/local-cluster.sh status                 # daemons and sinfo
#
# munged, slurmctld and slurmd from Debian's `munge` and `slurm-wlm` (installed with apt-get when
# missing) run as root; every file (slurm.conf, cgroup.conf, munge key and socket, spool, state, logs)
# lives in one folder, $LOCAL_SLURM_DIR (default: ${TMPDIR:-/tmp}/unet-dist-slurm), so nothing under
# /etc is touched. Two nodes by default, `<host>1` and `<host>2`: two slurmd on this machine, each
# with its own port and spool (Debian's slurmd runs several with -N), both at NodeAddr 127.0.0.1, so
# multi-node jobs (sbatch --nodes=2) really span two slurmd and two slurmstepd; with
# LOCAL_SLURM_NODES=1 the one node is named after the host. Partitions `debug` (default, no time
# limit) and `short` (5 minutes); no cgroups (proctrack/linuxproc, task/none); select/cons_tres;
# JobRequeue=1, ReturnToService=2; a requeued job may start again after 10 s (cred_expire), not 2 min.
# The node names need not resolve: the launchers reach the first node at its NodeAddr.
#
# Settings (environment): LOCAL_SLURM_DIR, LOCAL_SLURM_NODES (default 2), LOCAL_SLURM_CPUS (CPUs each
# node announces, default max(4, nproc): more than the cores is fine for tests), LOCAL_SLURM_MEM_MB
# (per node, default 8192), LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_SLURMD_PORT (default 6817 / 6818;
# node i listens on SLURMD_PORT + i - 1).
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/unet-dist-slurm}"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-6818}"
HOST="$(hostname -s)"
NODES="${LOCAL_SLURM_NODES:-2}"
CPUS="${LOCAL_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"
MEM_MB="${LOCAL_SLURM_MEM_MB:-8192}"
if [[ "$NODES" == 1 ]]; then NODE_NAMES=("$HOST"); else NODE_NAMES=($(seq -f "$HOST%g" 1 "$NODES")); fi

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

print_env() {
    echo "export SLURM_CONF=$DIR/slurm.conf"
    echo "export LOCAL_SLURM_DIR=$DIR"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root (it installs them with apt-get) or install them"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get here (Debian/Ubuntu only)"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,run}
    chmod 755 "$DIR"  # users other than root reach the munge socket through it
    if [[ ! -s "$DIR/munge.key" ]]; then
        # munged insists on a key readable by its user only.
        dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge.key"
    fi
    : >"$DIR/plugstack.conf"  # no SPANK plugins: /etc/slurm/plugstack.conf stays out of it
    cat >"$DIR/cgroup.conf" <<EOF
# No cgroups: proctrack/linuxproc and task/none track and bind nothing through them.
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
    cat >"$DIR/slurm.conf" <<EOF
# Written by slurm/local-cluster.sh: $NODES node(s) on $HOST (127.0.0.1).
ClusterName=unetdistlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/run/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Quick passes: a requeued job is started seconds after it becomes eligible, not a minute later.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The node announces what this file says, not what it detects: two-task jobs fit on a 2-core machine.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Short waits: a killed job is gone within 10 s, not the usual 30 s.
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
SlurmctldTimeout=120
MessageTimeout=20
$(for i in "${!NODE_NAMES[@]}"; do
    echo "NodeName=${NODE_NAMES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN"
done)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
# A partition with a 5-minute limit, for the launchers' "the cluster cannot run this" checks.
PartitionName=short Nodes=ALL MaxTime=5 State=UP OverSubscribe=NO
EOF
}

wait_idle() {
    local node state ready
    for _ in $(seq 1 120); do
        ready=0
        for node in "${NODE_NAMES[@]}"; do
            state="$(SLURM_CONF="$DIR/slurm.conf" sinfo -h -N -n "$node" -o %T 2>/dev/null | head -1 || true)"
            case "$state" in
                idle|mixed|allocated) ready=$((ready + 1)) ;;
                down*|drain*|fail*)  # left down by an earlier run: ReturnToService covers most, not all
                    SLURM_CONF="$DIR/slurm.conf" scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
            esac
        done
        ((ready == NODES)) && return 0
        sleep 0.5
    done
    die "nodes ${NODE_NAMES[*]} are not all idle after 60 s; see $DIR/log/"
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (munged, slurmctld and slurmd run as root here)"
    install_packages
    write_config
    export SLURM_CONF="$DIR/slurm.conf"
    if ! pid_alive "$DIR/run/munged.pid"; then
        munged --force --key-file="$DIR/munge.key" --socket="$DIR/run/munge.socket" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munged.seed"
    fi
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        # -i: ignore state left by an earlier cluster in this folder (old jobs would come back).
        slurmctld -i -f "$SLURM_CONF"
    fi
    for node in "${NODE_NAMES[@]}"; do
        pid_alive "$DIR/run/slurmd-$node.pid" || slurmd -f "$SLURM_CONF" -N "$node"
    done
    wait_idle
    say "cluster up: node(s) ${NODE_NAMES[*]} ($CPUS CPUs each), partitions debug (default) and short; config $SLURM_CONF, logs $DIR/log"
    print_env
}

stop_pidfile() {
    local file="$1" name="$2" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) did not stop: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

stop() {
    if [[ -f "$DIR/slurm.conf" ]]; then
        # Jobs first, so no slurmstepd outlives the daemons.
        SLURM_CONF="$DIR/slurm.conf" scancel --quiet --full --user=root 2>/dev/null || true
        sleep 1
    fi
    for file in "$DIR"/run/slurmd-*.pid; do stop_pidfile "$file" "slurmd $(basename "$file" .pid)"; done
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/run/munged.pid" munged
    say "stopped (config and logs kept in $DIR; delete it to start from scratch)"
}

status() {
    for name in munged slurmctld "${NODE_NAMES[@]/#/slurmd-}"; do
        if pid_alive "$DIR/run/$name.pid"; then echo "$name: running ($(cat "$DIR/run/$name.pid"))"
        else echo "$name: not running"; fi
    done
    [[ -f "$DIR/slurm.conf" ]] && SLURM_CONF="$DIR/slurm.conf" sinfo 2>&1 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) [[ -f "$DIR/slurm.conf" ]] || die "no cluster in $DIR (run: $0 start)"; print_env ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status|env   (eval \"\$($0 start)\" sets SLURM_CONF)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A one-node SLURM cluster on loopback, for tests and for trying launcher=slurm on one machine.
#
#   sudo bash slurm/local-cluster.sh up       install (Debian/Ubuntu, apt), configure, start
#   sudo bash slurm/local-cluster.sh status   exit 0 iff every daemon answers
#   sudo bash slurm/local-cluster.sh down     stop the daemons this script started
#
# Daemons: munged, MariaDB (unix socket only), slurmdbd (accounting: without it sacct fails
# and submitit cannot see job states), slurmctld, slurmd. They run as plain background
# processes with pid files under $STATE (no systemd needed), listen on 127.0.0.1 only, and
# `down` stops only those. /etc/slurm/slurm.conf and slurmdbd.conf are written with a marker
# line; a config without the marker belongs to someone else and is never overwritten.
#
# Environment: SDI_CLUSTER_CPUS (8) and SDI_CLUSTER_MEM_MB (65536) set what the node
# advertises (more than the machine has, so a small array runs at once; nothing enforces
# the limits); SDI_CLUSTER_STATE (/var/lib/sdi-local-cluster) holds pid files and logs.
set -euo pipefail

STATE="${SDI_CLUSTER_STATE:-/var/lib/sdi-local-cluster}"
CPUS="${SDI_CLUSTER_CPUS:-8}"
MEM_MB="${SDI_CLUSTER_MEM_MB:-65536}"
MARKER="# written by sdi-pipeline slurm/local-cluster.sh"
CONF_DIR=/etc/slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DB_SOCKET=/run/mysqld/mysqld.sock

say() { echo "[local-cluster] $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and apt-get is not available"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ours() { [ ! -e "$1" ] || grep -qxF "$MARKER" "$1"; }

write_configs() {
    for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf"; do
        ours "$f" || die "$f exists and was not written by this script; not touching it"
    done
    mkdir -p "$CONF_DIR" "$STATE"/{logs,ctld,spool,run}
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=sdilocal
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Loopback only: slurmctld, slurmd and srun never listen on other interfaces.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/logs/slurmctld.log
SlurmdLogFile=$STATE/logs/slurmd.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
# Per-core, per-MB scheduling: a job without --mem must not take the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# The node advertises more than the hardware has, so small arrays run side by side.
SlurmdParameters=config_overrides
# Schedule at once (the defaults add seconds to every submit-to-start, and up to a minute
# before a requeued job starts again).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
# submitit reads job states through sacct, which needs accounting.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MinJobAge=300
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/logs/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
}

# Our pid files: only these processes are ever stopped by `down`.
pidfile() { echo "$STATE/run/$1.pid"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# start NAME CHECK CMD...: unless CHECK already passes (a daemon we did not start, left
# alone), run CMD in the foreground of its own session, fully detached (no inherited stdio,
# or a caller piping this script's output never sees EOF), and record its pid.
start() {
    local name=$1 check=$2
    shift 2
    "$check" >/dev/null 2>&1 && return 0
    alive "$(pidfile "$name")" && return 0
    say "starting $name"
    setsid "$@" </dev/null >>"$STATE/logs/$name.out" 2>&1 &
    echo $! >"$(pidfile "$name")"
}

# wait_for WHAT SECONDS CMD...: poll until CMD succeeds.
wait_for() {
    local what=$1 secs=$2
    shift 2
    for _ in $(seq $((secs * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "$what did not come up in ${secs}s; see $STATE/logs/"
}

munge_ok() { munge -n | unmunge; }
db_ok() { mariadb --socket="$DB_SOCKET" -e 'select 1'; }
dbd_ok() { sacctmgr -n list cluster; }
ctld_ok() { scontrol ping | grep -q 'is UP'; }
node_ok() { sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'; }

up() {
    need_root
    install_packages
    write_configs
    mkdir -p /run/munge /run/mysqld
    chown munge:munge /run/munge
    chown mysql:mysql /run/mysqld
    # setpriv execs (runuser would stay as a parent that `down` would signal instead).
    start munged munge_ok setpriv --reuid=munge --regid=munge --init-groups \
        /usr/sbin/munged --foreground
    wait_for munged 20 munge_ok
    start mariadb db_ok /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$DB_SOCKET"
    wait_for MariaDB 60 db_ok
    mariadb --socket="$DB_SOCKET" -e 'CREATE DATABASE IF NOT EXISTS slurm_acct_db'
    start slurmdbd dbd_ok /usr/sbin/slurmdbd -D
    wait_for slurmdbd 30 dbd_ok
    start slurmctld ctld_ok /usr/sbin/slurmctld -D -i
    wait_for slurmctld 30 ctld_ok
    start slurmd node_ok /usr/sbin/slurmd -D -N localhost
    wait_for "slurmd (node localhost)" 60 node_ok
    # A node left DOWN/DRAIN by an earlier unclean stop comes back to service.
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    say "up: $(sinfo -h -o '%P %D nodes %c cpus %m MB %T')"
}

status() {
    local ok=0
    for check in munge_ok db_ok dbd_ok ctld_ok node_ok; do
        if "$check" >/dev/null 2>&1; then echo "$check: yes"; else echo "$check: no"; ok=1; fi
    done
    return $ok
}

# stop NAME: TERM the process of our pid file, wait up to 10 s, then KILL.
stop() {
    local name=$1 file
    file=$(pidfile "$1")
    alive "$file" || { rm -f "$file"; return 0; }
    local pid
    pid=$(cat "$file")
    say "stopping $name"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

down() {
    need_root
    for name in slurmd slurmctld slurmdbd mariadb munged; do stop "$name"; done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

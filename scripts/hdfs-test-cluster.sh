#!/usr/bin/env bash
# A real HDFS 2.7.3 on 127.0.0.1 for tests, CI and benchmarks: one NameNode and N DataNodes as
# background JVMs (no Hadoop distribution needed, Java 17 is enough).
#
#   scripts/hdfs-test-cluster.sh install               fetch and cache the jars (start does it too)
#   scripts/hdfs-test-cluster.sh start DIR [DATANODES] fresh cluster in DIR (default 1 DataNode);
#                                                      its last line is hdfs://127.0.0.1:PORT
#   scripts/hdfs-test-cluster.sh stop DIR              stop the processes that start put in DIR
#   scripts/hdfs-test-cluster.sh stop-node DIR NODE    stop one node (namenode, datanode1, ...)
#   scripts/hdfs-test-cluster.sh start-node DIR NODE   start it again on the same data (the
#                                                      NameNode on its old ports) and wait for it
#
# Where things come from (Maven Central is not reachable here; nothing is built):
# - Hadoop's jars: the `jars/` folder of pyspark 2.4.8's *source* distribution on PyPI (Hadoop
#   2.7.3: hadoop-hdfs, hadoop-common and their dependencies), fetched with `pip download` in a
#   throwaway venv (its setup.py needs `wheel` and `setuptools<70`); only the 54 jars a
#   NameNode/DataNode need are kept.
# - Jersey 1 (the NameNode's WebHDFS resources): Debian's libjersey1-{core,server,servlet}-java and
#   libjsr311-api-java, fetched with `apt-get download` and unpacked with dpkg-deb (not installed).
# - Java: the machine's `java`; if there is none, Debian's default-jre-headless is installed.
# Cached in $CACHEFS_HDFS_CACHE (default ~/.cache/cachefs-hdfs), so later starts fetch nothing.
#
# Everything listens on 127.0.0.1, on ports the kernel picks (the NameNode's RPC and HTTP ports
# are read from its log, then written into DIR/conf so DataNodes and restarts use them).
# DataNodes advertise the host name $CACHEFS_HDFS_ADVERTISE (default 127.0.0.1): clients with
# dfs.client.use.datanode.hostname=true connect there (benchmarks/seed_scenario.py: a relay on
# another host's address, same ports, in front of the DataNodes).
# Replication is min(3, DATANODES). In DIR: conf/, logs/NODE.log, pids/NODE.pid, data/NODE/,
# cluster.env (URI, ports, counts). JVM options: $CACHEFS_HDFS_JAVA_OPTS (default -Xmx256m);
# readiness timeout in seconds: $CACHEFS_HDFS_TIMEOUT (default 120).
set -euo pipefail

HADOOP_VERSION=2.7.3
PYSPARK_VERSION=2.4.8
# Hadoop 2.7.3's NameNode and DataNode with what they load, from pyspark's jars/ folder.
PYSPARK_JARS=(
    hadoop-annotations-2.7.3.jar hadoop-auth-2.7.3.jar hadoop-common-2.7.3.jar hadoop-hdfs-2.7.3.jar
    guava-14.0.1.jar commons-cli-1.2.jar commons-math3-3.4.1.jar xmlenc-0.52.jar
    commons-httpclient-3.1.jar commons-codec-1.10.jar commons-io-2.4.jar commons-net-3.1.jar
    commons-collections-3.2.2.jar javax.servlet-api-3.1.0.jar jetty-6.1.26.jar jetty-util-6.1.26.jar
    jsp-api-2.1.jar commons-logging-1.1.3.jar log4j-1.2.17.jar commons-lang-2.6.jar
    commons-configuration-1.6.jar commons-beanutils-1.9.4.jar commons-digester-1.8.jar
    slf4j-api-1.7.16.jar slf4j-log4j12-1.7.16.jar jackson-core-asl-1.9.13.jar
    jackson-mapper-asl-1.9.13.jar jackson-jaxrs-1.9.13.jar jackson-xc-1.9.13.jar avro-1.8.2.jar
    paranamer-2.8.jar snappy-java-1.1.8.2.jar xz-1.5.jar protobuf-java-2.5.0.jar gson-2.2.4.jar
    curator-client-2.7.1.jar curator-framework-2.7.1.jar curator-recipes-2.7.1.jar
    jsr305-1.3.9.jar htrace-core-3.1.0-incubating.jar zookeeper-3.4.6.jar commons-compress-1.20.jar
    httpclient-4.5.6.jar httpcore-4.4.10.jar apacheds-i18n-2.0.0-M15.jar
    apacheds-kerberos-codec-2.0.0-M15.jar api-asn1-api-1.0.0-M20.jar api-util-1.0.0-M20.jar
    netty-3.9.9.Final.jar netty-all-4.1.47.Final.jar xercesImpl-2.9.1.jar leveldbjni-all-1.8.jar
    activation-1.1.1.jar jaxb-api-2.2.2.jar
)
DEBIAN_PACKAGES=(libjersey1-core-java libjersey1-server-java libjersey1-servlet-java
    libjsr311-api-java)

CACHE_ROOT=${CACHEFS_HDFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cachefs-hdfs}
HOME_DIR=$CACHE_ROOT/hadoop-$HADOOP_VERSION  # lib/*.jar, webapps/, .complete
JAVA_OPTS=${CACHEFS_HDFS_JAVA_OPTS:--Xmx256m}
TIMEOUT=${CACHEFS_HDFS_TIMEOUT:-120}
ADVERTISE=${CACHEFS_HDFS_ADVERTISE:-127.0.0.1}
PYTHON=${PYTHON:-python3}

die() { echo "hdfs-test-cluster: $*" >&2; exit 1; }
note() { echo "hdfs-test-cluster: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- install ---------------------------------------------------------------------------------

install_java() {
    command -v java >/dev/null && return
    note "no java: installing Debian's default-jre-headless"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq default-jre-headless >/dev/null
}

install_jars() {
    [ -f "$HOME_DIR/.complete" ] && return
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.lock"
    flock 9  # another start may be installing right now
    if [ -f "$HOME_DIR/.complete" ]; then exec 9>&-; return; fi
    local t0=$SECONDS work log
    work=$(mktemp -d "$CACHE_ROOT/.install.XXXXXX")
    log=$work/install.log
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    note "installing Hadoop $HADOOP_VERSION's jars into $HOME_DIR (once)"

    # Hadoop's jars from pyspark's sdist; pip runs its setup.py for metadata, which needs an
    # old setuptools: a throwaway venv keeps that out of every other environment.
    "$PYTHON" -m venv "$work/venv" >"$log" 2>&1 || { cat "$log" >&2; die "python3 -m venv failed"; }
    "$work/venv/bin/pip" install -q --disable-pip-version-check wheel 'setuptools<70' >"$log" 2>&1 \
        || { cat "$log" >&2; die "pip install wheel setuptools failed"; }
    "$work/venv/bin/pip" download -q --disable-pip-version-check --no-cache-dir --no-deps \
        --no-binary :all: --no-build-isolation "pyspark==$PYSPARK_VERSION" -d "$work/sdist" \
        >"$log" 2>&1 || { cat "$log" >&2; die "pip download pyspark==$PYSPARK_VERSION failed"; }
    local members=() jar
    for jar in "${PYSPARK_JARS[@]}"; do members+=("pyspark-$PYSPARK_VERSION/deps/jars/$jar"); done
    tar xzf "$work/sdist/pyspark-$PYSPARK_VERSION.tar.gz" -C "$work" "${members[@]}"
    mkdir -p "$work/home/lib"
    mv "$work/pyspark-$PYSPARK_VERSION/deps/jars/"*.jar "$work/home/lib/"
    rm -rf "$work/sdist" "$work/venv" "$work/pyspark-$PYSPARK_VERSION"

    # Jersey 1 from Debian, unpacked only.
    mkdir -p "$work/deb"
    if ! (cd "$work/deb" && apt-get download "${DEBIAN_PACKAGES[@]}") >"$log" 2>&1; then
        as_root apt-get update -qq  # a fresh machine has no package lists yet
        (cd "$work/deb" && apt-get download "${DEBIAN_PACKAGES[@]}") >"$log" 2>&1 \
            || { cat "$log" >&2; die "apt-get download ${DEBIAN_PACKAGES[*]} failed"; }
    fi
    local deb
    for deb in "$work/deb"/*.deb; do dpkg-deb -x "$deb" "$work/debroot"; done
    find "$work/debroot/usr/share/java" -maxdepth 1 -type f -name '*.jar' \
        -exec cp {} "$work/home/lib/" \;

    # The web servers look their webapps up on the classpath; empty ones are enough.
    mkdir -p "$work/home/webapps/hdfs" "$work/home/webapps/datanode" "$work/home/webapps/secondary"
    local count want=$((${#PYSPARK_JARS[@]} + ${#DEBIAN_PACKAGES[@]}))
    count=$(find "$work/home/lib" -name '*.jar' | wc -l)
    [ "$count" = "$want" ] || die "expected $want jars, got $count"
    touch "$work/home/.complete"
    rm -rf "$HOME_DIR"
    mv "$work/home" "$HOME_DIR"
    rm -rf "$work"
    trap - EXIT
    exec 9>&-
    note "installed $count jars ($(du -sh "$HOME_DIR" | cut -f1)) in $((SECONDS - t0)) s"
}

cmd_install() {
    install_java
    install_jars
}

# --- processes -------------------------------------------------------------------------------

# Every JVM started here carries -Dcachefs.hdfs.dir=DIR and -Dcachefs.hdfs.node=NODE, so a pid
# file is only ever acted on if that pid is still the process it names.
owns_pid() {  # DIR NODE PID
    [ -r "/proc/$3/cmdline" ] || return 1
    local args
    args=$(tr '\0' '\n' <"/proc/$3/cmdline" 2>/dev/null) || return 1
    grep -qxF -- "-Dcachefs.hdfs.dir=$1" <<<"$args" \
        && grep -qxF -- "-Dcachefs.hdfs.node=$2" <<<"$args"
}

node_pid() {  # DIR NODE: prints the pid if that node is running
    local pid
    pid=$(cat "$1/pids/$2.pid" 2>/dev/null) || return 1
    owns_pid "$1" "$2" "$pid" && echo "$pid"
}

launch() {  # DIR NODE CLASS [ARGS...]: starts a JVM in the background, records its pid
    local dir=$1 node=$2 class=$3
    shift 3
    mkdir -p "$dir/logs" "$dir/pids"
    echo "=== cachefs: starting $node at $(date '+%F %T') ===" >>"$dir/logs/$node.log"
    # shellcheck disable=SC2086  # JAVA_OPTS is a list of options
    setsid java $JAVA_OPTS -Djava.net.preferIPv4Stack=true \
        -Dcachefs.hdfs.dir="$dir" -Dcachefs.hdfs.node="$node" \
        -Dhadoop.log.dir="$dir/logs" -Dhadoop.home.dir="$HOME_DIR" \
        -cp "$dir/conf:$HOME_DIR:$HOME_DIR/lib/*" "$class" "$@" \
        >>"$dir/logs/$node.log" 2>&1 </dev/null &
    echo $! >"$dir/pids/$node.pid"
}

stop_pids() {  # DIR NODE...: SIGTERM (and SIGCONT, for a paused one), then SIGKILL after 15 s
    local dir=$1 node pid waited=0
    shift
    local pids=()
    for node in "$@"; do
        pid=$(node_pid "$dir" "$node") || continue
        kill -TERM "$pid" 2>/dev/null || true
        kill -CONT "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((waited >= 150)); then kill -KILL "$pid" 2>/dev/null || true; fi
            sleep 0.1
            waited=$((waited + 1))
        done
    done
    for node in "$@"; do rm -f "$dir/pids/$node.pid"; done
}

all_nodes() {  # DIR: the nodes with a pid file, NameNode last (so DataNodes stop first)
    local f names=()
    for f in "$1"/pids/datanode*.pid; do [ -e "$f" ] && names+=("$(basename "$f" .pid)"); done
    [ -e "$1/pids/namenode.pid" ] && names+=(namenode)
    echo "${names[@]}"
}

# --- configuration ---------------------------------------------------------------------------

property() { printf '  <property><name>%s</name><value>%s</value></property>\n' "$1" "$2"; }

write_conf() {  # DIR RPC_PORT HTTP_PORT REPLICATION
    local dir=$1 rpc=$2 http=$3 replication=$4
    mkdir -p "$dir/conf"
    {
        echo '<?xml version="1.0"?>'
        echo '<configuration>'
        property fs.defaultFS "hdfs://127.0.0.1:$rpc"
        property hadoop.tmp.dir "$dir/tmp"
        echo '</configuration>'
    } >"$dir/conf/core-site.xml"
    {
        echo '<?xml version="1.0"?>'
        echo '<configuration>'
        property dfs.namenode.name.dir "$dir/data/namenode"
        property dfs.namenode.http-address "127.0.0.1:$http"
        property dfs.namenode.https-address 127.0.0.1:0
        property dfs.namenode.secondary.http-address 127.0.0.1:0
        property dfs.namenode.secondary.https-address 127.0.0.1:0
        property dfs.datanode.address 127.0.0.1:0
        property dfs.datanode.http.address 127.0.0.1:0
        property dfs.datanode.https.address 127.0.0.1:0
        property dfs.datanode.ipc.address 127.0.0.1:0
        property dfs.datanode.hostname "$ADVERTISE"
        property dfs.replication "$replication"
        # Out of safe mode as soon as the blocks are reported (restarts), no 30 s extension.
        property dfs.namenode.safemode.extension 0
        # Tests may write small blocks to get files of many blocks.
        property dfs.namenode.fs-limits.min-block-size 512
        echo '</configuration>'
    } >"$dir/conf/hdfs-site.xml"
    # Logs to stderr (DIR/logs/NODE.log), without a line per file operation.
    cat >"$dir/conf/log4j.properties" <<'EOF'
log4j.rootLogger=INFO,console
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.err
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{ISO8601} %p %c{2}: %m%n
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.apache.hadoop.hdfs.server.datanode.DataNode.clienttrace=WARN
log4j.logger.org.apache.hadoop.hdfs.StateChange=WARN
log4j.logger.BlockStateChange=WARN
log4j.logger.org.apache.hadoop.util.NativeCodeLoader=ERROR
EOF
}

# --- readiness -------------------------------------------------------------------------------

# Waits until the NameNode is out of safe mode and every DataNode in WANT (running, not paused)
# is live on the NameNode at the address its log shows; on failure prints why and the log tails.
# Args: DIR WANT_NODES... ; the NameNode's HTTP port comes from DIR/cluster.env.
wait_ready() {
    local dir=$1
    shift
    "$PYTHON" - "$dir" "$TIMEOUT" "$@" <<'EOF'
import json, os, re, sys, time, urllib.request

dir, timeout, want = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
env = dict(line.split("=", 1) for line in open(f"{dir}/cluster.env").read().split())
MARK = "=== cachefs: starting "


def last_run(node):
    try:
        text = open(f"{dir}/logs/{node}.log", errors="replace").read()
    except FileNotFoundError:
        return ""
    return text[text.rfind(MARK):] if MARK in text else text


def alive(node):
    try:
        pid = int(open(f"{dir}/pids/{node}.pid").read())
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        return f"-Dcachefs.hdfs.node={node}".encode() in args
    except (OSError, ValueError):
        return False


def jmx(name):
    url = f"http://127.0.0.1:{env['HTTP_PORT']}/jmx?qry=Hadoop:service=NameNode,name={name}"
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.load(r)["beans"][0]


deadline = time.monotonic() + timeout
why = "not checked yet"
while True:
    dead = [n for n in ["namenode", *want] if not alive(n)]
    if dead:
        why = f"{', '.join(dead)} exited"
        break
    ports = {}  # LiveNodes is keyed "advertised-host:xfer-port": a node is known by its port
    for node in want:
        m = re.search(r"Opened streaming server at /[\d.]+:(\d+)", last_run(node))
        if m:
            ports[node] = m.group(1)
    try:
        info = jmx("NameNodeInfo")
        live = {k.rsplit(":", 1)[1]: v for k, v in json.loads(info["LiveNodes"]).items()}
        missing = [n for n in want if ports.get(n) not in live or not live[ports[n]]["capacity"]]
        if info["Safemode"]:
            why = f"NameNode in safe mode: {info['Safemode'].strip()}"
        elif missing:
            why = f"DataNodes not live yet: {', '.join(missing)} ({len(live)} live)"
        else:
            sys.exit(0)
    except (OSError, ValueError, KeyError, IndexError) as e:
        why = f"NameNode not answering on its HTTP port {env['HTTP_PORT']}: {e}"
    if time.monotonic() > deadline:
        why = f"not ready after {timeout:.0f} s: {why}"
        break
    time.sleep(0.2)

print(f"hdfs-test-cluster: {why}", file=sys.stderr)
for node in ["namenode", *want]:
    lines = last_run(node).splitlines()[-25:]
    print(f"--- {dir}/logs/{node}.log (last {len(lines)} lines) ---", file=sys.stderr)
    print("\n".join(line[:300] for line in lines), file=sys.stderr)
sys.exit(1)
EOF
}

# Waits for the NameNode's first start to log its RPC and HTTP ports; prints "RPC HTTP".
namenode_ports() {  # DIR
    local dir=$1 log=$1/logs/namenode.log rpc="" http="" i pid
    pid=$(cat "$dir/pids/namenode.pid")
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        rpc=$(grep -oE 'NameNode RPC up at: [^ ]*:[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
        http=$(grep -oE 'Jetty bound to port [0-9]+' "$log" | grep -oE '[0-9]+$' || true)
        if [ -n "$rpc" ] && [ -n "$http" ]; then
            echo "$rpc $http"
            return
        fi
        owns_pid "$dir" namenode "$pid" || break
        sleep 0.1
    done
    echo "hdfs-test-cluster: the NameNode did not come up; last lines of $log:" >&2
    tail -n 40 "$log" | cut -c1-300 >&2
    return 1
}

# Running DataNodes that are not paused (SIGSTOP): the ones the NameNode should see live.
running_datanodes() {  # DIR
    local node pid nodes=()
    for node in $(all_nodes "$1"); do
        [ "$node" = namenode ] && continue
        pid=$(node_pid "$1" "$node") || continue
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = T ] && continue
        nodes+=("$node")
    done
    echo "${nodes[@]}"
}

# --- commands --------------------------------------------------------------------------------

abs_dir() { mkdir -p "$1" && cd "$1" && pwd -P; }

cmd_start() {
    [ $# -ge 1 ] || die "usage: $0 start DIR [DATANODES]"
    local datanodes=${2:-1}
    [[ $datanodes =~ ^[1-9][0-9]*$ ]] || die "DATANODES must be a positive number, got '$datanodes'"
    local dir t0=$SECONDS
    dir=$(abs_dir "$1")
    cmd_install

    # A fresh cluster: DIR is new, empty, or an earlier cluster of this script (not running).
    local node running=""
    for node in $(all_nodes "$dir"); do
        node_pid "$dir" "$node" >/dev/null && running+=" $node"
    done
    [ -z "$running" ] || die "a cluster is running in $dir ($running ); stop it first"
    if [ -e "$dir/cluster.env" ]; then
        rm -rf "$dir/conf" "$dir/data" "$dir/logs" "$dir/pids" "$dir/tmp" "$dir/cluster.env"
    elif [ -n "$(ls -A "$dir")" ]; then
        die "$dir is not empty and holds no cluster of this script: give a new or empty directory"
    fi

    local replication=$((datanodes < 3 ? datanodes : 3))
    write_conf "$dir" 0 0 "$replication"
    mkdir -p "$dir/logs" "$dir/pids"
    printf 'URI=\nRPC_PORT=0\nHTTP_PORT=0\nDATANODES=%s\nREPLICATION=%s\n' \
        "$datanodes" "$replication" >"$dir/cluster.env"
    # shellcheck disable=SC2086  # JAVA_OPTS is a list of options
    if ! java $JAVA_OPTS -Dhadoop.log.dir="$dir/logs" -cp "$dir/conf:$HOME_DIR:$HOME_DIR/lib/*" \
        org.apache.hadoop.hdfs.server.namenode.NameNode -format -nonInteractive \
        >"$dir/logs/format.log" 2>&1 </dev/null; then
        tail -n 40 "$dir/logs/format.log" | cut -c1-300 >&2
        die "formatting the NameNode failed (log: $dir/logs/format.log)"
    fi

    launch "$dir" namenode org.apache.hadoop.hdfs.server.namenode.NameNode
    local ports rpc http
    if ! ports=$(namenode_ports "$dir"); then
        cmd_stop "$dir"
        die "the NameNode did not start"
    fi
    read -r rpc http <<<"$ports"
    # From now on the conf names the real ports: DataNodes find the NameNode, and a restarted
    # NameNode (start-node) comes back where clients and DataNodes expect it.
    write_conf "$dir" "$rpc" "$http" "$replication"
    printf 'URI=hdfs://127.0.0.1:%s\nRPC_PORT=%s\nHTTP_PORT=%s\nDATANODES=%s\nREPLICATION=%s\n' \
        "$rpc" "$rpc" "$http" "$datanodes" "$replication" >"$dir/cluster.env"

    local i nodes=()
    for ((i = 1; i <= datanodes; i++)); do
        launch "$dir" "datanode$i" org.apache.hadoop.hdfs.server.datanode.DataNode \
            -D "dfs.datanode.data.dir=$dir/data/datanode$i"
        nodes+=("datanode$i")
    done
    if ! wait_ready "$dir" "${nodes[@]}"; then
        cmd_stop "$dir"
        die "the cluster in $dir did not become ready"
    fi
    note "$datanodes DataNode(s), replication $replication, ready in $((SECONDS - t0)) s;" \
        "logs in $dir/logs; NameNode web UI http://127.0.0.1:$http"
    echo "hdfs://127.0.0.1:$rpc"
}

cmd_stop() {
    [ $# -eq 1 ] || die "usage: $0 stop DIR"
    [ -d "$1" ] || return 0
    local dir
    dir=$(cd "$1" && pwd -P)
    # shellcheck disable=SC2046
    stop_pids "$dir" $(all_nodes "$dir")
}

check_node() {  # DIR NODE
    [ -f "$1/cluster.env" ] || die "no cluster in $1"
    [[ $2 == namenode || $2 =~ ^datanode[1-9][0-9]*$ ]] || die "NODE is namenode or datanodeN"
    [ "$2" = namenode ] || [ -d "$1/data/$2" ] || die "$2 is not a node of the cluster in $1"
}

cmd_stop_node() {
    [ $# -eq 2 ] || die "usage: $0 stop-node DIR NODE"
    local dir
    dir=$(cd "$1" && pwd -P) || die "no directory $1"
    check_node "$dir" "$2"
    stop_pids "$dir" "$2"
}

cmd_start_node() {
    [ $# -eq 2 ] || die "usage: $0 start-node DIR NODE"
    local dir node=$2
    dir=$(cd "$1" && pwd -P) || die "no directory $1"
    check_node "$dir" "$node"
    ! node_pid "$dir" "$node" >/dev/null || die "$node is already running"
    if [ "$node" = namenode ]; then
        launch "$dir" namenode org.apache.hadoop.hdfs.server.namenode.NameNode
    else
        launch "$dir" "$node" org.apache.hadoop.hdfs.server.datanode.DataNode \
            -D "dfs.datanode.data.dir=$dir/data/$node"
    fi
    # shellcheck disable=SC2046
    wait_ready "$dir" $(running_datanodes "$dir") || die "$node did not come back"
}

case ${1:-} in
    install) shift; cmd_install "$@" ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    stop-node) shift; cmd_stop_node "$@" ;;
    start-node) shift; cmd_start_node "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

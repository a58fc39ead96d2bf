"""`clonectl serve --metrics`: Prometheus metrics and a read-only status page.

Served by the manager process, not by the nbdkit plugin: the plugin runs
in nbdkit's embedded /usr/bin/python3, which sees the repository through
its pythonpath= but not the virtual environment where prometheus_client
is installed, and the data path should carry nothing it does not need.
The manager asks the target for one status snapshot over the control
socket on each scrape (a custom Collector), so every value of a scrape
comes from the same moment and nothing is counted twice.

Paths (GET only; nothing here changes anything):
  /metrics      Prometheus text exposition format
  / or /status  the status page: LUs, clones with a picture of each map,
                sessions, replication links, running jobs; it polls
                /status.json every second
  /status.json  what the page shows: the target's status (times ISO 8601)
                and each clone's map as runs (Target.clone_picture)
"""

import http.server
import json
import logging
import socket
import threading
import time

from prometheus_client import exposition
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily,
                                    GaugeMetricFamily)

from . import control, errors, units

log = logging.getLogger("clonectl.monitor")

SCRAPE_TIMEOUT = 10.0
# Cells of a map picture on the status page.
PAGE_MAP_CELLS = 512


def parse_address(text):
    """'9100' -> ('127.0.0.1', 9100); 'ADDR:PORT' and '[V6]:PORT' as
    given.  Loopback by default: the page and the metrics show names and
    paths of the state directory."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise errors.InvalidArgument(
            reason="invalid --metrics {!r}: give PORT or ADDR:PORT, e.g. "
            "9100 (127.0.0.1:9100) or 0.0.0.0:9100".format(text))
    return host, int(port)


def _gauge(name, doc, labels=()):
    return GaugeMetricFamily(name, doc, labels=list(labels))


class StatusCollector:
    """Metrics from one target status snapshot per scrape."""

    def __init__(self, control_socket):
        self.control_socket = control_socket

    def snapshot(self):
        st = control.call(self.control_socket, "status",
                          reply_timeout=SCRAPE_TIMEOUT)
        try:
            st["rsgs"] = control.call(self.control_socket, "rsg_list",
                                      reply_timeout=SCRAPE_TIMEOUT)
        except errors.Error:
            pass
        return st

    def collect(self):
        up = _gauge("clonectl_up", "1 if the target answered this scrape")
        try:
            st = self.snapshot()
        except (OSError, errors.Error, ValueError) as e:
            log.warning("metrics: the target does not answer: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metric_families(st)


def metric_families(st):
    """Prometheus metric families of a target status snapshot."""
    sizes = {lu["name"]: lu["size"] for lu in st.get("lus", [])}
    m = {}

    def g(name, doc, labels=()):
        if name not in m:
            m[name] = _gauge(name, doc, labels)
        return m[name]

    def c(name, doc, labels=()):
        if name not in m:
            m[name] = CounterMetricFamily(name, doc, labels=list(labels))
        return m[name]

    errs = {"lu": 0, "clone": 0, "session": 0, "link": 0,
            "recovery": len(st.get("recovery_problems") or [])}

    for lu in st.get("lus", []):
        g("clonectl_lu_size_bytes", "Size of the LU",
          ["lu"]).add_metric([lu["name"]], lu["size"])
        g("clonectl_export_connections", "NBD connections of hosts to the "
          "export", ["export"]).add_metric([lu["name"]], lu["connections"])
        g("clonectl_export_gateway_connections", "Connections of the iSCSI "
          "gateway to the export", ["export"]).add_metric(
              [lu["name"]], lu.get("gateway_connections", 0))
        g("clonectl_lu_error", "1 if the LU cannot be served",
          ["lu"]).add_metric([lu["name"]], 1 if lu.get("error") else 0)
        errs["lu"] += bool(lu.get("error"))

    for cl in st.get("clones", []):
        key = [cl["name"], cl["source"]]
        g("clonectl_clone_dirty_bytes", "Bytes that differ from the Source "
          "(dirty extents times the granularity)", ["clone", "source"]) \
            .add_metric(key, cl["bytes_dirty"])
        g("clonectl_clone_state", "1 for the clone's current state",
          ["clone", "source", "state"]).add_metric(key + [cl["state"]], 1)
        g("clonectl_clone_error", "1 if the clone is broken or its last "
          "operation failed", ["clone", "source"]).add_metric(
              key, 1 if cl.get("error") else 0)
        errs["clone"] += bool(cl.get("error"))
        if cl["state"] in ("fractured", "restoring"):
            g("clonectl_export_connections", "NBD connections of hosts to "
              "the export", ["export"]).add_metric([cl["name"]],
                                                   cl["connections"])
            g("clonectl_export_gateway_connections", "Connections of the "
              "iSCSI gateway to the export", ["export"]).add_metric(
                  [cl["name"]], cl.get("gateway_connections", 0))
        op = cl.get("operation")
        if op:
            okey = [cl["name"], op["operation"]]
            # What is left of a running job; a finished one is done (the
            # extents dirty since are the next job's).
            left = cl["bytes_dirty"] if op.get("running") else 0
            restore = cl.get("restore")
            if restore and op.get("running"):
                left = min(sizes.get(cl["source"], cl["size"]),
                           restore["pending_extents"] * cl["granularity"])
            g("clonectl_job_running", "1 while the clone's operation runs",
              ["clone", "operation"]).add_metric(
                  okey, 1 if op.get("running") else 0)
            g("clonectl_job_done_bytes", "Bytes the operation copied",
              ["clone", "operation"]).add_metric(okey, op["bytes_copied"])
            g("clonectl_job_total_bytes", "Bytes copied plus bytes left to "
              "copy", ["clone", "operation"]).add_metric(
                  okey, op["bytes_copied"] + left)
            g("clonectl_job_rate_bytes_per_second", "Average copy rate of "
              "the operation", ["clone", "operation"]).add_metric(
                  okey, op.get("rate") or 0)
        restore = cl.get("restore")
        if restore:
            g("clonectl_restore_pending_bytes", "Bytes the protected "
              "restore still has to copy", ["clone"]).add_metric(
                  [cl["name"]], min(cl["size"], restore["pending_extents"] *
                                    cl["granularity"]))
            c("clonectl_cod_requests", "Host requests that waited for copy "
              "on demand", ["clone"]).add_metric(
                  [cl["name"]], restore["cod_requests"])
            c("clonectl_cod_extents", "Extents copied on demand",
              ["clone"]).add_metric([cl["name"]], restore["cod_extents"])
            g("clonectl_cod_queue_depth", "Host requests waiting for copy on "
              "demand now", ["clone"]).add_metric(
                  [cl["name"]], restore["cod_queue_depth"])
            for q, k in (("0.5", "cod_wait_p50_ms"),
                         ("0.99", "cod_wait_p99_ms")):
                if restore.get(k) is not None:
                    g("clonectl_cod_wait_seconds", "Copy-on-demand wait of "
                      "host requests, quantiles", ["clone", "quantile"]) \
                        .add_metric([cl["name"], q], restore[k] / 1e3)

    for s in st.get("sessions", []):
        key = [s["name"], s["source"]]
        size = sizes.get(s["source"], 0)
        gran = s["granularity"]
        g("clonectl_session_pending_bytes", "Bytes of the marked point in "
          "time still to send", ["session", "source"]).add_metric(
              key, min(size, s["extents_to_send"] * gran))
        g("clonectl_session_tracked_bytes", "Bytes changed since the last "
          "mark", ["session", "source"]).add_metric(
              key, min(size, s["tracked_extents"] * gran))
        g("clonectl_session_marked", "1 while the session is marked",
          ["session", "source"]).add_metric(key, 1 if s["marked"] else 0)
        g("clonectl_session_save_area_used_bytes", "Old data saved by copy "
          "on first write", ["session", "source"]).add_metric(
              key, s["save_area"]["used_bytes"])
        g("clonectl_session_error", "1 while the session's last transfer "
          "failed or it gave up its mark (its failure in the status)",
          ["session", "source"]).add_metric(key, 1 if s.get("failure") else 0)
        errs["session"] += bool(s.get("failure"))
        tr = s.get("transfer")
        if tr:
            g("clonectl_transfer_running", "1 while a transfer runs",
              ["session"]).add_metric([s["name"]],
                                      1 if s.get("transferring") else 0)
            g("clonectl_transfer_sent_bytes", "Bytes the last or running "
              "transfer sent", ["session"]).add_metric(
                  [s["name"]], tr.get("bytes_sent", 0))
        for d in s["destinations"]:
            g("clonectl_session_destination_pending_bytes", "Bytes still to "
              "send to the destination", ["session", "destination"]) \
                .add_metric([s["name"], d["uri"]],
                            min(size, d["pending_extents"] * gran))
            g("clonectl_session_destination_consistent", "1 if the "
              "destination holds a marked point in time",
              ["session", "destination"]).add_metric(
                  [s["name"], d["uri"]],
                  1 if d["state"] == "consistent" else 0)

    for r in st.get("rsgs", []):
        if r.get("loaded") is False:
            continue    # counted among the recovery problems
        g("clonectl_rsg_primary", "1 if this node is the group's primary",
          ["rsg"]).add_metric([r["name"]], 1 if r["role"] == "primary"
                              else 0)
        if r["role"] != "primary":
            g("clonectl_rsg_consistent", "1 if this secondary is "
              "consistent", ["rsg"]).add_metric(
                  [r["name"]], 1 if r.get("consistent") else 0)
            continue
        g("clonectl_srl_used_bytes", "Bytes of the SRL not yet acknowledged "
          "by every link", ["rsg"]).add_metric([r["name"]], r["srl"]["used"])
        g("clonectl_srl_size_bytes", "Size of the SRL",
          ["rsg"]).add_metric([r["name"]], r["srl"]["size"])
        for link in r.get("links") or []:
            lkey = [r["name"], link["secondary"]]
            g("clonectl_link_state", "1 for the link's current state",
              ["rsg", "secondary", "state"]).add_metric(
                  lkey + [link["state"]], 1)
            if link.get("lag_updates") is not None:
                g("clonectl_link_lag_updates", "Updates the secondary has "
                  "not acknowledged", ["rsg", "secondary"]).add_metric(
                      lkey, link["lag_updates"])
                g("clonectl_link_lag_bytes", "SRL bytes the secondary has "
                  "not acknowledged", ["rsg", "secondary"]).add_metric(
                      lkey, link["lag_bytes"])
            if link.get("dcm_extents") is not None:
                g("clonectl_link_dcm_extents", "Extents marked in the link's "
                  "data change map", ["rsg", "secondary"]).add_metric(
                      lkey, link["dcm_extents"])
            c("clonectl_link_sent_bytes", "Bytes sent to the secondary since "
              "the target started", ["rsg", "secondary"]).add_metric(
                  lkey, link.get("bytes_sent") or 0)
            errs["link"] += link["state"] == "failed"

    errors_family = g("clonectl_errors", "Objects in error now, by kind "
                      "(recovery: problems found at start-up)", ["kind"])
    for kind, n in sorted(errs.items()):
        errors_family.add_metric([kind], n)
    return list(m.values())


def page_status(control_socket, cells=PAGE_MAP_CELLS):
    """What /status.json serves: the target's status and each clone's map."""
    st = control.call(control_socket, "status", reply_timeout=SCRAPE_TIMEOUT)
    st["rsgs"] = control.call(control_socket, "rsg_list",
                              reply_timeout=SCRAPE_TIMEOUT)
    st["maps"] = {}
    for cl in st["clones"]:
        try:
            st["maps"][cl["name"]] = control.call(
                control_socket, "clone_picture", reply_timeout=SCRAPE_TIMEOUT,
                clone=cl["name"], cells=cells)
        except errors.Error:
            pass    # removed meanwhile
    st["time"] = time.time()
    return units.iso_times(st)


class _Handler(http.server.BaseHTTPRequestHandler):

    server_version = "clonectl"

    def log_message(self, fmt, *args):
        log.debug("monitor: " + fmt, *args)

    def _send(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        mon = self.server.monitor
        try:
            if path == "/metrics":
                self._send(200, exposition.generate_latest(mon.registry),
                           exposition.CONTENT_TYPE_LATEST)
            elif path in ("/", "/status"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/status.json":
                try:
                    st = page_status(mon.control_socket)
                except (OSError, errors.Error) as e:
                    self._send(503, json.dumps({"error": {
                        "message": "the target does not answer: {}".format(e),
                        "type": "Unavailable"}}).encode(),
                        "application/json")
                    return
                self._send(200, json.dumps(st, sort_keys=True).encode(),
                           "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_HEAD = do_GET


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class Monitor:
    """The metrics and status page listener of a manager."""

    def __init__(self, bind, port, control_socket):
        self.control_socket = control_socket
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(control_socket))
        cls = _HTTPServer
        if ":" in bind:
            cls = type("_HTTPServer6", (_HTTPServer,),
                       {"address_family": socket.AF_INET6})
        try:
            self.httpd = cls((bind, port), _Handler)
        except OSError as e:
            raise errors.InvalidArgument(
                reason="--metrics {}:{}: {}".format(bind, port,
                                                    e.strerror or e))
        self.httpd.monitor = self
        self.address = "{}:{}".format(
            "[{}]".format(bind) if ":" in bind else bind,
            self.httpd.server_address[1])
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       args=(control.STOP_POLL,),
                                       name="monitor", daemon=True)
        self.thread.start()

    def stop(self):
        # shutdown() waits for a serve_forever loop: one never started
        # (a start that failed after the port was bound) would hang it.
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>clonectl status</title>
<style>
body { font: 14px sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { text-align: left; padding: 2px 10px; border-bottom: 1px solid #ddd; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg.map { border: 1px solid #999; vertical-align: middle; }
.clean { fill: #cfe8cf; } .dirty { fill: #e69a28; }
.pending { fill: #2f6fdf; } .protected { fill: #a23fc0; }
.legend span { display: inline-block; width: 12px; height: 12px;
  margin: 0 4px 0 12px; vertical-align: middle; }
#error { color: #b00; }
</style></head>
<body>
<h1>clonectl status</h1>
<p>Read-only; updated every second. <span id="updated"></span>
<span id="error"></span></p>
<p class="legend">Map:<span style="background:#cfe8cf"></span>clean
<span style="background:#e69a28"></span>dirty (differs from the Source)
<span style="background:#2f6fdf"></span>to restore
<span style="background:#a23fc0"></span>written by hosts during the restore
</p>
<h2>LUs</h2><div id="lus"></div>
<h2>Clones</h2><div id="clones"></div>
<h2>Running jobs</h2><div id="jobs"></div>
<h2>Sessions</h2><div id="sessions"></div>
<h2>Replication links</h2><div id="links"></div>
<h2>Problems</h2><div id="problems"></div>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
function size(n) {
  if (n === null || n === undefined) return "-";
  const u = [["PiB", 2 ** 50], ["TiB", 2 ** 40], ["GiB", 2 ** 30],
             ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [name, f] of u) {
    if (n >= f) return (Math.round(n / f * 10) / 10) + name;
  }
  return n + "B";
}
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) {
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
function table(id, headers, rows) {
  const box = document.getElementById(id);
  if (!rows.length) { box.replaceChildren(el("p", {}, "none")); return; }
  const t = el("table", {id: id + "-table"},
               el("tr", {}, ...headers.map(h => el("th", {}, h))));
  for (const r of rows) {
    t.append(el("tr", r.attrs || {}, ...r.cells.map(c =>
      c instanceof Node ? el("td", {}, c) :
      el("td", typeof c === "number" ? {class: "num"} : {}, c))));
  }
  box.replaceChildren(t);
}
function picture(map) {
  const W = 512, H = 18;
  const svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("class", "map");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("data-clone", map.name);
  for (const [kind, n] of Object.entries(map.counts)) {
    svg.setAttribute("data-" + kind, n);
  }
  const ext = Math.max(1, map.extents);
  for (const [kind, runs] of Object.entries(map.runs)) {
    for (const [s, e] of runs) {
      const r = document.createElementNS(SVGNS, "rect");
      r.setAttribute("class", kind);
      r.setAttribute("x", (s / ext * W).toFixed(2));
      r.setAttribute("width", Math.max(0.5, (e - s) / ext * W).toFixed(2));
      r.setAttribute("y", 0); r.setAttribute("height", H);
      svg.append(r);
    }
  }
  return svg;
}
function render(st) {
  document.getElementById("updated").textContent = "As of " + st.time + ".";
  document.getElementById("error").textContent = "";
  table("lus", ["LU", "size", "mode", "served", "connections", "error"],
    st.lus.map(l => ({attrs: {"data-lu": l.name}, cells: [l.name,
      size(l.size), l.readonly ? "ro" : "rw", l.exported ? "yes" : "no",
      l.connections, l.error || ""]})));
  table("clones", ["clone", "Source", "state", "dirty", "map", "extents",
                   "error"],
    st.clones.map(c => {
      const map = st.maps[c.name];
      const counts = map ? Object.entries(map.counts).filter(
        ([k]) => k !== "clean").map(([k, n]) => k + " " + n).join(", ") : "";
      return {attrs: {"data-clone": c.name, "data-state": c.state},
              cells: [c.name, c.source, c.state, size(c.bytes_dirty),
                      map ? picture(map) : "-", counts, c.error || ""]};
    }));
  const jobs = [];
  for (const c of st.clones) {
    const op = c.operation;
    if (!op || !op.running) continue;
    const left = c.restore ? c.restore.pending_extents * c.granularity
                           : c.bytes_dirty;
    jobs.push({attrs: {"data-job": c.name}, cells: [c.operation.operation,
      c.name, size(op.bytes_copied), size(op.bytes_copied + left),
      size(op.rate) + "/s", op.eta === null ? "-" : op.eta + " s"]});
  }
  for (const s of st.sessions) {
    if (!s.transferring || !s.transfer) continue;
    jobs.push({attrs: {"data-job": s.name}, cells: ["transfer", s.name,
      size(s.transfer.bytes_sent), "-", "-", "-"]});
  }
  table("jobs", ["job", "object", "done", "total", "rate", "ETA"], jobs);
  table("sessions", ["session", "Source", "marked since", "extents to send",
                     "transfer", "destinations"],
    st.sessions.map(s => ({attrs: {"data-session": s.name}, cells: [s.name,
      s.source, s.marked ? s.mark_time : "no", s.extents_to_send,
      s.transferring ? "running" :
        (s.last_transfer ? s.last_transfer.result : "-"),
      s.destinations.map(d => d.uri + " (" + d.state + ")").join(", ")]})));
  const links = [];
  for (const r of st.rsgs) {
    if (r.role !== "primary") {
      links.push({cells: [r.name, "(secondary of " + (r.primary || "-") +
        ")", r.consistent ? "consistent" : "inconsistent", "-", "-"]});
      continue;
    }
    for (const l of r.links || []) {
      links.push({attrs: {"data-link": r.name + "->" + l.secondary},
        cells: [r.name, l.secondary, l.state,
          l.lag_updates === null ? "-" : l.lag_updates + " updates, " +
          size(l.lag_bytes), l.error || ""]});
    }
  }
  table("links", ["group", "secondary", "state", "lag", "error"], links);
  table("problems", ["problem"], (st.recovery_problems || []).map(
    p => ({cells: [p.message]})));
}
function poll() {
  fetch("/status.json", {cache: "no-store"})
    .then(r => r.json())
    .then(st => {
      if (st.error) throw new Error(st.error.message);
      render(st);
    })
    .catch(e => {
      document.getElementById("error").textContent = String(e);
    });
}
poll();
setInterval(poll, 1000);
</script>
</body></html>
"""

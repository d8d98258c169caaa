// pgconcord's web console: reads the agent's JSON API by short polling and draws it. It
// writes nothing but the operator's retry and discard. Plain DOM, no framework and no build
// step, so the package ships it as it is and nothing is ever loaded from the internet.
"use strict";

(() => {
  const STATUS_EVERY_MS = 1500;
  const TIMELINE_EVERY_MS = 5000;
  const CONFLICTS_EVERY_MS = 4000;
  // A hung agent must show as down, not as figures that silently stop moving.
  const REQUEST_TIMEOUT_MS = 5000;
  const OK_BELOW_SECONDS = 5;
  const SLOW_BELOW_SECONDS = 60;
  // Resolved conflicts accumulate; the newest are what an operator looks at.
  const SHOWN_CONFLICTS = 50;
  const PALETTE = ["#1f6fb2", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490",
    "#a16207", "#be185d", "#4d7c0f", "#334155"];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // Every figure from the databases goes in as text, never as markup: rows hold anything.
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attributes = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- formatting -------------------------------------------------------------------------

  const number = (value) => (value === null || value === undefined ? "—" : value.toLocaleString("en"));

  function seconds(value) {
    if (value === null || value === undefined) return "—";
    if (value < 10) return `${value.toFixed(1)} s`;
    if (value < 120) return `${Math.round(value)} s`;
    if (value < 7200) return `${Math.round(value / 60)} min`;
    return `${(value / 3600).toFixed(1)} h`;
  }

  function bytes(value) {
    if (value === null || value === undefined) return "—";
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let size = value;
    let unit = 0;
    while (size >= 1024 && unit < units.length - 1) {
      size /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${size} bytes` : `${size.toFixed(size < 10 ? 1 : 0)} ${units[unit]}`;
  }

  const clockTime = (date) => date.toLocaleTimeString("en-GB", { hour12: false });

  function when(text) {
    if (!text) return "—";
    const date = new Date(text);
    return Number.isNaN(date.getTime()) ? String(text) : date.toLocaleString("en-GB", { hour12: false });
  }

  const plural = (count, one, many) => `${number(count)} ${count === 1 ? one : many}`;
  const json = (value) => JSON.stringify(value);

  // -- requests ---------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // The token travels in the HttpOnly cookie the agent set on /?token=...: same-origin
  // credentials are all the console needs.
  async function request(path, options = {}) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: controller.signal,
        ...options,
      });
    } catch (error) {
      throw new Error(controller.signal.aborted ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : "the connection failed");
    } finally {
      clearTimeout(timer);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    return { response, body, text };
  }

  function reasonOf(result) {
    const { response, body, text } = result;
    if (body && typeof body === "object" && body.still_parked && typeof body.still_parked === "object") {
      const reasons = Object.entries(body.still_parked).map(([ref, why]) => `${ref} still parked: ${why}`);
      if (reasons.length) return reasons.join("; ");
    }
    if (body && typeof body === "object") {
      for (const key of ["error", "reason", "message", "detail"]) {
        if (typeof body[key] === "string") return body[key];
      }
    }
    const line = (text || "").replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
    return line ? line.slice(0, 300) : `HTTP ${response.status}`;
  }

  async function getJson(path) {
    const result = await request(path);
    if (!result.response.ok) throw new HttpError(result.response.status, reasonOf(result));
    if (result.body === null) throw new Error(`${path} did not answer JSON`);
    return result.body;
  }

  // -- the agent's reachability -----------------------------------------------------------

  let downSince = null;
  let lastStatusText = null; // the status last drawn, so that an unchanged one is not redrawn

  // answered: the agent is there but could not say what the cluster's state is.
  function agentDown(reason, answered = false) {
    if (downSince === null) downSince = new Date();
    const banner = $("agent-down");
    banner.replaceChildren(
      el("strong", { text: answered ? "The agent has no status to show." : "The agent does not answer." }),
      answered
        ? ` ${location.host} answers, but without the cluster's status since ${clockTime(downSince)}: ${reason}. `
        : ` ${location.host} has not answered since ${clockTime(downSince)} (${reason}). `,
      "The figures are hidden until it answers again; this page keeps trying.",
    );
    banner.hidden = false;
    $("figures").hidden = true;
    const verdict = $("verdict");
    verdict.textContent = answered ? "No status" : "Agent unreachable";
    verdict.className = "verdict bad";
    $("freshness").textContent = "";
    document.title = "pgconcord console: agent unreachable";
    lastStatusText = null; // the verdict above is drawn again once the agent answers
  }

  function agentUp() {
    downSince = null;
    $("agent-down").hidden = true;
    $("figures").hidden = false;
  }

  // -- status: verdict, problems, matrix, nodes, joining ------------------------------------

  function pairVerdict(pair, nodes) {
    if (!pair) return { level: "unknown", word: "unknown" };
    if (pair.state === "evicted" || pair.state === "parted") return { level: "behind", word: pair.state };
    const down = [pair.origin, pair.target].filter((name) => nodes.get(name) && !nodes.get(name).reachable);
    if (down.length) return { level: "behind", word: `${down.join(" and ")} unreachable` };
    let level;
    let word;
    if (pair.lag_seconds === null || pair.lag_seconds === undefined) {
      level = "slow";
      word = "not pulled yet";
    } else if (pair.lag_seconds < OK_BELOW_SECONDS) {
      level = "ok";
      word = "ok";
    } else if (pair.lag_seconds < SLOW_BELOW_SECONDS) {
      level = "slow";
      word = "slow";
    } else {
      level = "behind";
      word = "behind";
    }
    // The agent's live heartbeat: a pair it runs that stopped pulling, or failed, is not
    // "ok" whatever the lag measured in the databases says.
    if (pair.live === false) {
      level = "behind";
      word = pair.agent_healthy === false ? "failing" : "stalled";
    }
    if (pair.state === "joining") word += " (joining)";
    return { level, word };
  }

  function matrixCell(pair, nodes) {
    const verdict = pairVerdict(pair, nodes);
    const lines = [el("span", { class: "word", text: verdict.word })];
    if (pair && pair.lag_seconds !== null && pair.lag_seconds !== undefined) {
      lines.push(el("span", { class: "figure" }, el("span", { class: "lag", text: seconds(pair.lag_seconds) }), " lag"));
    }
    if (pair && pair.pending_changes !== null && pair.pending_changes !== undefined) {
      const size = pair.pending_bytes ? ` (${bytes(pair.pending_bytes)})` : "";
      lines.push(el("span", { class: "figure" }, el("span", { class: "pending", text: number(pair.pending_changes) }), ` pending${size}`));
    }
    if (pair && pair.applied_changes !== null && pair.applied_changes !== undefined) {
      lines.push(el("span", { class: "figure" }, el("span", { class: "applied", text: number(pair.applied_changes) }), " applied"));
    }
    if (pair && pair.agent_running === false) {
      lines.push(el("span", { class: "detail", text: "not run by this agent" }));
    } else if (pair && typeof pair.last_pull_seconds_ago === "number") {
      lines.push(el("span", { class: "detail", text: `pulled ${seconds(pair.last_pull_seconds_ago)} ago` }));
    } else if (pair && pair.last_pull_at) {
      lines.push(el("span", { class: "detail", text: `pulled ${when(pair.last_pull_at)}` }));
    }
    if (pair && pair.agent_sentence) {
      lines.push(el("span", { class: "sentence", text: pair.agent_sentence }));
    }
    if (pair && pair.last_error && pair.live === false) {
      lines.push(el("span", { class: "sentence", text: `last error: ${pair.last_error}` }));
    }
    return el(
      "td",
      {
        class: `cell ${verdict.level}`,
        dataset: pair ? { origin: pair.origin, target: pair.target } : {},
        title: pair && pair.agent_sentence ? pair.agent_sentence : undefined,
      },
      lines,
    );
  }

  function renderMatrix(status, nodes) {
    const names = status.nodes.map((node) => node.name);
    const pairs = new Map(status.pairs.map((pair) => [`${pair.origin}\u0000${pair.target}`, pair]));
    const head = el("tr", {}, el("th", { scope: "col", class: "corner" }, "origin ↓ / target →"),
      names.map((name) => el("th", { scope: "col", text: name })));
    const rows = names.map((origin) => el("tr", {}, el("th", { scope: "row", text: origin }),
      names.map((target) => (origin === target
        ? el("td", { class: "cell self" }, el("span", { class: "visually-hidden", text: "same node" }), "—")
        : matrixCell(pairs.get(`${origin}\u0000${target}`), nodes)))));
    $("matrix").replaceChildren(
      el("caption", { class: "visually-hidden", text: "Lag and pending changes from each origin (rows) to each target (columns)" }),
      el("thead", {}, head),
      el("tbody", {}, rows),
    );
  }

  function renderNodes(status) {
    const head = el("tr", {}, ["Node", "Reachable", "Membership", "Capture", "Change log",
      "Parked", "Conflicts", "Catalog", "Notes"].map((name) => el("th", { scope: "col", text: name })));
    const rows = status.nodes.map((node) => {
      const notes = [];
      if (node.error) notes.push(el("span", { class: "bad-text", text: node.error }));
      if (node.purge_failure) {
        notes.push(el("span", { class: "bad-text", text: `not purged since ${when(node.purge_failing_since)}: ${node.purge_failure}` }));
      }
      const membership = node.membership || "—";
      return el("tr", { class: node.reachable ? "" : "down", dataset: { node: node.name } },
        el("th", { scope: "row", text: node.name }),
        el("td", { class: node.reachable ? "ok-text" : "bad-text", text: node.reachable ? "yes" : "no" }),
        el("td", { class: membership === "active" || membership === "—" ? "" : "slow-text", text: membership,
          title: node.membership_changed_at ? `since ${when(node.membership_changed_at)}` : undefined }),
        el("td", { text: node.capture || "—" }),
        el("td", { text: node.change_log_rows === null || node.change_log_rows === undefined ? "—"
          : `${plural(node.change_log_rows, "row", "rows")}, ${bytes(node.change_log_bytes)}` }),
        el("td", { class: `parked-count${node.parked_changes ? " bad-text" : ""}`, text: number(node.parked_changes) }),
        el("td", { text: number(node.conflicts) },
          node.conflicts_by_type && Object.keys(node.conflicts_by_type).length
            ? el("span", { class: "detail", text: ` (${Object.entries(node.conflicts_by_type)
              .map(([type, count]) => `${type} ${number(count)}`).join(", ")})` })
            : null),
        el("td", { text: node.catalog_version === null || node.catalog_version === undefined ? "—" : `v${node.catalog_version}` }),
        el("td", {}, notes.length ? notes : "—"));
    });
    $("nodes").replaceChildren(
      el("caption", { class: "visually-hidden", text: "Each node's state" }),
      el("thead", {}, head),
      el("tbody", {}, rows),
    );
  }

  function renderJoining(status) {
    const joining = status.nodes.filter((node) => node.membership === "joining");
    $("joining-section").hidden = joining.length === 0;
    $("joining").replaceChildren(...joining.map((node) => {
      const incoming = status.pairs.filter((pair) => pair.target === node.name);
      const applied = incoming.reduce((sum, pair) => sum + (pair.applied_changes || 0), 0);
      const pending = incoming.reduce((sum, pair) => sum + (pair.pending_changes || 0), 0);
      const total = applied + pending;
      return el("article", { class: "card", dataset: { joining: node.name } },
        el("h3", { text: `${node.name} is joining` }),
        el("p", { text: `Since ${when(node.membership_changed_at)}; every node keeps its whole change log for it until \`pgconcord join ${node.name}\` has finished.` }),
        total > 0 ? el("p", {},
          el("progress", { max: total, value: applied, "aria-label": `${node.name} catch-up` }),
          ` ${number(applied)} of ${number(total)} changes applied (${Math.floor((100 * applied) / total)} %)`) : null,
        el("ul", {}, incoming.map((pair) => el("li", {
          text: `from ${pair.origin}: ${number(pair.pending_changes)} pending, lag ${seconds(pair.lag_seconds)}, ${number(pair.applied_changes)} applied`,
        }))));
    }));
  }

  function renderStatus(status, text) {
    const now = new Date();
    $("freshness").textContent = `Figures of ${clockTime(now)}, refreshed every ${STATUS_EVERY_MS / 1000} s.`;
    if (text === lastStatusText) return;
    lastStatusText = text;
    const nodes = new Map(status.nodes.map((node) => [node.name, node]));
    $("cluster-name").textContent = `· cluster ${status.cluster}`;
    const problems = status.problems || [];
    const verdict = $("verdict");
    if (problems.length === 0) {
      verdict.textContent = `Healthy: ${plural(status.nodes.length, "node", "nodes")}, every one reached, no problems`;
      verdict.className = "verdict ok";
    } else {
      verdict.textContent = `${plural(problems.length, "problem needs", "problems need")} a person`;
      verdict.className = "verdict bad";
    }
    document.title = `pgconcord ${status.cluster}: ${problems.length ? `${problems.length} problems` : "healthy"}`;
    $("problems").replaceChildren(...(problems.length
      ? problems.map((problem) => el("li", { class: "bad-text", text: problem }))
      : [el("li", { class: "none", text: `None: every node is reachable and within ${status.lag_threshold_seconds} s of every other.` })]));
    renderMatrix(status, nodes);
    renderNodes(status);
    renderJoining(status);
  }

  async function refreshStatus() {
    try {
      // The status says "unhealthy" with a non-2xx code while still being the status.
      const result = await request("/api/v1/status");
      if (result.body && Array.isArray(result.body.nodes)) {
        agentUp();
        renderStatus(result.body, result.text);
      } else {
        agentDown(reasonOf(result), true);
      }
    } catch (error) {
      agentDown(error.message);
    }
  }

  // -- the timeline chart -----------------------------------------------------------------

  function niceCeiling(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    // Ceilings whose half is a round figure too: the middle grid line is labelled.
    for (const step of [1, 2, 4, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  // The span the samples cover, in whole 5 minutes, up to the hour the agent keeps: an agent
  // started a minute ago gets a readable chart rather than a dot at the right edge.
  function spanMinutes(series) {
    const times = series.flatMap((each) => each.samples.map((s) => s[0]));
    if (!times.length) return 5;
    const covered = (Date.now() / 1000 - Math.min(...times)) / 60;
    return Math.min(60, Math.max(5, Math.ceil(covered / 5) * 5));
  }

  function chart(title, unit, series, interval, pick, format) {
    const width = 720;
    const height = 200;
    const left = 56;
    const right = 12;
    const top = 12;
    const bottom = 26;
    const now = Math.max(Date.now() / 1000, ...series.flatMap((each) => each.samples.map((s) => s[0])));
    const minutes = spanMinutes(series);
    const span = minutes * 60;
    const start = now - span;
    const values = series.flatMap((each) => each.samples.map(pick).filter((v) => typeof v === "number"));
    const ceiling = niceCeiling(Math.max(0, ...values));
    const x = (t) => left + ((t - start) / span) * (width - left - right);
    const y = (v) => top + (1 - v / ceiling) * (height - top - bottom);

    const summary = series.map((each) => {
      const own = each.samples.map(pick).filter((v) => typeof v === "number");
      if (!own.length) return `${each.origin} → ${each.target}: no figure yet`;
      return `${each.origin} → ${each.target}: now ${format(own[own.length - 1])}, peak ${format(Math.max(...own))}`;
    });
    const figure = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart",
      "aria-label": `${title} over the last ${minutes} minutes. ${summary.join("; ") || "No samples yet."}`,
    });
    for (const fraction of [0, 0.5, 1]) {
      const v = ceiling * fraction;
      figure.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
      figure.append(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, format(v)));
    }
    for (const quarter of [4, 3, 2, 1, 0]) {
      const ago = (minutes * quarter) / 4;
      figure.append(svg("text", { x: x(now - ago * 60), y: height - 8, "text-anchor": "middle", class: "axis" },
        ago ? `−${Number.isInteger(ago) ? ago : ago.toFixed(1)} min` : "now"));
    }
    series.forEach((each, index) => {
      // A gap in the samples (agent stopped, node unreachable) is drawn as a gap, not a line.
      let segment = [];
      let previous = null;
      const flush = () => {
        if (segment.length === 1) {
          const [px, py] = segment[0];
          figure.append(svg("circle", { cx: px, cy: py, r: 2, fill: PALETTE[index % PALETTE.length] }));
        } else if (segment.length > 1) {
          figure.append(svg("polyline", {
            points: segment.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "),
            fill: "none", stroke: PALETTE[index % PALETTE.length], "stroke-width": 2,
          }));
        }
        segment = [];
      };
      for (const sample of each.samples) {
        const value = pick(sample);
        if (typeof value !== "number" || sample[0] < start) {
          flush();
          previous = null;
          continue;
        }
        if (previous !== null && sample[0] - previous > 3 * interval) flush();
        segment.push([x(sample[0]), y(value)]);
        previous = sample[0];
      }
      flush();
    });
    const legend = el("ul", { class: "legend" }, series.map((each, index) => el("li", {},
      el("span", { class: "swatch", style: `background:${PALETTE[index % PALETTE.length]}`, "aria-hidden": "true" }),
      summary[index])));
    return el("figure", { class: "chart-box" },
      el("figcaption", { text: `${title} (${unit}), the last ${minutes} minutes` }), figure, legend);
  }

  async function refreshTimeline() {
    const box = $("charts");
    try {
      const timeline = await getJson("/api/v1/timeline");
      const series = (timeline.pairs || []).filter((pair) => Array.isArray(pair.samples));
      const interval = timeline.interval_seconds || 5;
      if (!series.some((pair) => pair.samples.length)) {
        box.replaceChildren(el("p", { class: "hint", text: `No samples yet: the agent records one every ${interval} s.` }));
        return;
      }
      box.replaceChildren(
        chart("Lag", "seconds", series, interval, (s) => s[1], seconds),
        chart("Applied changes per second", "changes/s", series, interval, (s) => s[2],
          (v) => `${v < 10 && v % 1 ? v.toFixed(1) : number(Math.round(v))}/s`),
      );
    } catch (error) {
      box.replaceChildren(el("p", { class: "bad-text", text: `The timeline cannot be read: ${error.message}` }));
    }
  }

  // -- conflicts and parked changes -------------------------------------------------------

  function columnsOf(...rows) {
    const names = [];
    for (const row of rows) {
      if (!row || typeof row !== "object") continue;
      for (const name of Object.keys(row)) if (!names.includes(name)) names.push(name);
    }
    return names;
  }

  const cellText = (row, name) => (!row || typeof row !== "object" ? "" : name in row ? json(row[name]) : "(absent)");

  function rowTable(caption, row) {
    if (!row || typeof row !== "object") return el("p", { class: "hint", text: "(no row: a delete)" });
    return el("table", { class: "row" }, el("caption", { class: "visually-hidden", text: caption }),
      el("tbody", {}, Object.entries(row).map(([name, value]) => el("tr", {},
        el("th", { scope: "row", text: name }), el("td", { text: json(value) })))));
  }

  function versions(record) {
    const local = record.local || {};
    const incoming = record.incoming || {};
    const kept = record.resolution;
    const names = columnsOf(local.row, incoming.row);
    const heading = (label, side) => el("th", { scope: "col", class: kept === side ? "kept" : "" },
      label, kept === side ? el("span", { class: "badge", text: "kept" }) : null);
    const head = el("tr", {}, el("th", { scope: "col", text: "column" }),
      heading(local.origin ? `${record.node}'s row (written at ${local.origin})` : `${record.node}'s row`, "local"),
      heading(`incoming ${incoming.operation || "change"} from ${incoming.origin || "another node"}`, "incoming"));
    const rows = names.map((name) => {
      const mine = cellText(local.row, name);
      const theirs = cellText(incoming.row, name);
      const differs = local.row && incoming.row && mine !== theirs;
      return el("tr", { class: differs ? "differs" : "" },
        el("th", { scope: "row" }, name, differs ? el("span", { class: "differs-mark", text: " (differs)" }) : null),
        el("td", { text: local.row ? mine : "(no row)" }),
        el("td", { text: incoming.row ? theirs : "(deleted)" }));
    });
    if (!names.length) {
      rows.push(el("tr", {}, el("th", { scope: "row", text: "row" }),
        el("td", { text: local.row ? json(local.row) : "(no row)" }),
        el("td", { text: incoming.row ? json(incoming.row) : "(deleted)" })));
    }
    return el("table", { class: "versions" },
      el("caption", { class: "visually-hidden", text: "Both versions of the row, side by side" }),
      el("thead", {}, head), el("tbody", {}, rows));
  }

  function keptSentence(record) {
    if (record.resolution === "incoming") return `Kept: ${(record.incoming || {}).origin}'s incoming version.`;
    if (record.resolution === "local") return `Kept: the row ${record.node} had.`;
    if (record.resolution === "merged") return "Kept: a column-by-column merge of both.";
    return `Resolution: ${record.resolution}.`;
  }

  function conflictCard(record) {
    return el("article", { class: "card conflict", dataset: { ref: record.ref } },
      el("h3", {}, `${record.type} on ${record.node}`, el("span", { class: "muted", text: ` · ${record.table} ${json(record.key)}` })),
      el("p", { class: "muted", text: `${record.ref}, detected ${when(record.detected_at)}. ${keptSentence(record)}` }),
      el("div", { class: "scroll" }, versions(record)));
  }

  let busy = false;

  async function act(record, action, card) {
    if (busy) return;
    busy = true;
    const result = $("action-result");
    for (const button of card.querySelectorAll("button")) button.disabled = true;
    result.className = "action-result";
    result.textContent = `${action === "retry" ? "Retrying" : "Discarding"} ${record.ref}…`;
    try {
      // A reference is NODE:ID; the colon stays as it is, as the CLI spells it.
      const ref = encodeURIComponent(record.ref).replace(/%3A/gi, ":");
      const answer = await request(`/api/v1/conflicts/${ref}/${action}`, {
        method: "POST",
        headers: { Accept: "application/json" },
      });
      if (answer.response.ok) {
        result.className = "action-result ok-text";
        result.textContent = `${record.ref} ${action === "retry" ? "retried" : "discarded"}.`;
      } else {
        result.className = "action-result bad-text";
        result.textContent = `${record.ref} was not ${action === "retry" ? "retried" : "discarded"}: ${answer.response.status === 401 ? "the token is missing or wrong" : reasonOf(answer)}`;
      }
    } catch (error) {
      result.className = "action-result bad-text";
      result.textContent = `${record.ref}: ${error.message}`;
    } finally {
      busy = false;
      lastConflictsText = null;
      await Promise.all([refreshConflicts(), refreshStatus()]);
    }
  }

  function parkedCard(record) {
    const incoming = record.incoming || {};
    const actions = el("div", { class: "actions" });
    const card = el("article", { class: "card parked", dataset: { ref: record.ref } },
      el("h3", {}, `${record.ref}`, el("span", { class: "muted", text: ` · ${record.table} ${json(record.key)}` })),
      el("p", { class: "muted", text: `${incoming.operation || "change"} from ${incoming.origin || "?"}, parked on ${record.node} at ${when(record.detected_at)}` }),
      el("p", { class: "reason" }, el("strong", { text: "Reason: " }), record.reason || "—"),
      rowTable("The change's row", incoming.row),
      actions);
    // Discarding loses the change for good: it asks once more, in the page, not in a dialog.
    const plain = () => actions.replaceChildren(
      el("button", { type: "button", text: "Retry", onclick: () => act(record, "retry", card) }),
      el("button", { type: "button", class: "danger", text: "Discard", onclick: confirmDiscard }));
    function confirmDiscard() {
      actions.replaceChildren(
        el("span", { text: `Discard ${record.ref} for good? It will never be applied on ${record.node}. ` }),
        el("button", { type: "button", class: "danger", text: "Yes, discard", onclick: () => act(record, "discard", card) }),
        el("button", { type: "button", text: "Cancel", onclick: plain }));
      actions.querySelector("button").focus();
    }
    plain();
    return card;
  }

  let lastConflictsText = null;

  function renderConflicts(records, missing) {
    const parked = records.filter((r) => r.kind === "parked" && r.state === "parked");
    const settled = records.filter((r) => r.kind === "parked" && r.state !== "parked");
    const conflicts = records.filter((r) => r.kind === "conflict")
      .sort((a, b) => String(b.detected_at).localeCompare(String(a.detected_at)));
    const history = settled.length ? ` ${plural(settled.length, "change was", "changes were")} retried or discarded before.` : "";
    $("parked").replaceChildren(
      ...(missing ? [el("p", { class: "bad-text", text: `Not listed, as their nodes cannot be read: ${missing}` })] : []),
      el("p", { class: parked.length ? "bad-text" : "none", text: parked.length
        ? `${plural(parked.length, "change waits", "changes wait")} for you.${history}`
        : `None: every change was applied.${history}` }),
      ...parked.map(parkedCard));
    const shown = conflicts.slice(0, SHOWN_CONFLICTS);
    $("conflicts").replaceChildren(
      el("p", { class: "none", text: conflicts.length
        ? `${plural(conflicts.length, "conflict", "conflicts")} recorded${conflicts.length > shown.length ? `; the newest ${shown.length} are shown` : ""}.`
        : "None recorded." }),
      ...shown.map(conflictCard));
  }

  async function refreshConflicts() {
    try {
      const result = await request("/api/v1/conflicts");
      if (result.response.status === 401) {
        lastConflictsText = null;
        const message = "Conflicts and parked changes need the console's token: open this page once as /?token=TOKEN (the token is PGCONCORD_TOKEN or the file [http] token_file names).";
        $("parked").replaceChildren(el("p", { class: "bad-text", text: message }));
        $("conflicts").replaceChildren(el("p", { class: "bad-text", text: message }));
        return;
      }
      if (!result.response.ok || !Array.isArray(result.body)) throw new Error(reasonOf(result));
      // Drawn again only when they changed, so that a half-made choice is not wiped away.
      if (result.text + (result.response.headers.get("Pgconcord-Unreachable") || "") === lastConflictsText || busy) return;
      const missing = result.response.headers.get("Pgconcord-Unreachable");
      lastConflictsText = result.text + (missing || "");
      renderConflicts(result.body, missing);
    } catch (error) {
      lastConflictsText = null;
      $("parked").replaceChildren(el("p", { class: "bad-text", text: `Parked changes cannot be read: ${error.message}` }));
      $("conflicts").replaceChildren();
    }
  }

  // -- the loops --------------------------------------------------------------------------

  // Each loop waits for its own answer before asking again: a slow agent is never flooded.
  // A tab nobody looks at asks seldom (each status costs the nodes a few statements).
  const HIDDEN_EVERY_MS = 15000;
  function every(milliseconds, refresh) {
    let timer = null;
    let running = false;
    const loop = async () => {
      if (running) return; // the request under way schedules the next one
      running = true;
      clearTimeout(timer);
      try {
        await refresh();
      } finally {
        running = false;
        timer = setTimeout(loop, document.hidden ? Math.max(milliseconds, HIDDEN_EVERY_MS) : milliseconds);
      }
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) loop();
    });
    loop();
  }

  document.addEventListener("DOMContentLoaded", () => {
    every(STATUS_EVERY_MS, refreshStatus);
    every(TIMELINE_EVERY_MS, refreshTimeline);
    every(CONFLICTS_EVERY_MS, refreshConflicts);
  });
})();

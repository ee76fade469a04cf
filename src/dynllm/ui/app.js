// dynllm dashboard. Plain JavaScript, no framework, no build step.
//
// Every figure comes from the admin routes, sent with the admin key the user
// typed (kept in this tab's sessionStorage only, sent as a Bearer header):
//   GET  /admin/models                  polled every 2 s (and after each event or action)
//   GET  /admin/events                  lifecycle events as SSE
//   GET  /admin/models/{m}/logs?follow  a model's log as SSE
//   POST /admin/models/load | unload    the buttons (JSON bodies: admin POSTs need them)
// The two SSE routes are read with fetch() and a stream reader, because
// EventSource cannot send an Authorization header.  This page is served by
// the dynllm it talks to (CSP connect-src 'self'), so the routes are there.
// Text from the server only ever goes into textContent, never into HTML.
"use strict";

(() => {
  const KEY_STORAGE = "dynllm.adminKey";
  const POLL_MS = 2000;
  const MAX_EVENTS = 200;
  const MAX_LOG_LINES = 2000;
  const FEED_RETRY_MS = [1000, 2000, 5000, 10000, 30000];
  const FEED_REFUSED_RETRY_MS = 60000;

  const $ = (id) => document.getElementById(id);

  let adminKey = sessionStorage.getItem(KEY_STORAGE) || "";
  let models = null; // the last /admin/models answer
  let skewSeconds = 0; // the server's clock minus this browser's
  let blockedKey = null; // a key the server refused: polling waits for another
  const cards = new Map(); // model name -> card

  // ------------------------------------------------------------ small helpers

  /** Sleeps that end early when the key changes (streams then reconnect at once). */
  const sleepers = new Set();
  function sleep(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        sleepers.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      sleepers.add(done);
    });
  }
  function wakeSleepers() {
    for (const done of [...sleepers]) done();
  }

  function authHeaders(extra = {}) {
    const headers = { ...extra };
    if (adminKey) headers.Authorization = `Bearer ${adminKey}`;
    return headers;
  }

  /** The plain-words message of an error answer (OpenAI shape, KServe shape or text). */
  async function errorMessage(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error) {
        if (typeof body.error === "string") return body.error;
        if (typeof body.error.message === "string") return body.error.message;
      }
    } catch (_) {
      // Not JSON: fall through to the status line.
    }
    return text && text.length < 300 ? text : `HTTP ${response.status} ${response.statusText}`;
  }

  function now() {
    return Date.now() / 1000 + skewSeconds;
  }

  function ago(t) {
    if (t == null) return "never";
    const s = Math.max(0, now() - t);
    if (s < 5) return "just now";
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function duration(s) {
    if (s == null) return "";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 90) return `${s.toFixed(1)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function megabytes(mb) {
    if (mb == null) return "–";
    return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GB` : `${mb} MB`;
  }

  function percent(part, whole) {
    if (!whole) return 0;
    return Math.min(100, Math.max(0, (part / whole) * 100));
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------ notices

  function showNotice(text, kind) {
    const notice = $("notice");
    notice.textContent = text;
    notice.className = `notice ${kind || ""}`;
    notice.hidden = false;
  }

  function clearNotice() {
    $("notice").hidden = true;
  }

  function authProblem(status, message) {
    blockedKey = adminKey;
    const hint = adminKey
      ? "Enter a valid admin key above."
      : "Enter an admin key above (it is kept in this browser tab only).";
    const what = status === 401 ? "dynllm needs an admin key" : "dynllm refused the request";
    showNotice(`${what} (${status}): ${message} ${hint}`, "error");
    if (document.activeElement === document.body) $("admin-key").focus();
  }

  // ------------------------------------------------------------ the key form

  function showKeyState() {
    const input = $("admin-key");
    input.placeholder = adminKey ? "saved for this tab" : "not set";
    $("key-forget").disabled = !adminKey;
  }

  function setKey(key) {
    adminKey = key;
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    blockedKey = null;
    showKeyState();
    clearNotice();
    // Streams opened with the old key reconnect with the new one.
    events.restart();
    for (const card of cards.values()) if (card.log) card.log.restart();
    wakeSleepers();
    refreshNow();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("admin-key");
    setKey(input.value.trim());
    input.value = "";
  });
  $("key-forget").addEventListener("click", () => setKey(""));

  // ------------------------------------------------------------ polling /admin/models

  let refreshing = null;
  let refreshAgain = false;

  /** Fetch /admin/models now; calls during a fetch are folded into one more. */
  function refreshNow() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    refreshing = (async () => {
      do {
        refreshAgain = false;
        await refresh();
      } while (refreshAgain);
      refreshing = null;
    })();
    return refreshing;
  }

  async function refresh() {
    if (blockedKey !== null && blockedKey === adminKey) return;
    let response;
    try {
      response = await fetch("/admin/models", { headers: authHeaders(), cache: "no-store" });
    } catch (_) {
      showNotice("dynllm is not answering; retrying every few seconds…", "error");
      return;
    }
    if (response.status === 401 || response.status === 403) {
      authProblem(response.status, await errorMessage(response));
      return;
    }
    if (!response.ok) {
      showNotice(`/admin/models answered ${response.status}: ${await errorMessage(response)}`, "error");
      return;
    }
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) {
      // The Date header has whole seconds: only a clear difference is corrected.
      const skew = (date - Date.now()) / 1000;
      skewSeconds = Math.abs(skew) > 5 ? skew : 0;
    }
    models = await response.json();
    clearNotice();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    render();
  }

  // ------------------------------------------------------------ rendering

  function render() {
    if (!models) return;
    const total = models.vram_total_mb;
    const used = models.vram_used_mb;
    const list = models.models || [];
    renderBudget(total, used, list);

    const seen = new Set();
    const container = $("models");
    list.forEach((model, index) => {
      seen.add(model.name);
      let card = cards.get(model.name);
      if (!card) {
        card = makeCard(model.name);
        cards.set(model.name, card);
      }
      // Move only a card that is out of place: moving a node drops its focus.
      if (container.children[index] !== card.root) {
        container.insertBefore(card.root, container.children[index] || null);
      }
      updateCard(card, model, total);
    });
    for (const [name, card] of cards) {
      if (!seen.has(name)) {
        if (card.log) card.log.stop();
        card.root.remove();
        cards.delete(name);
      }
    }
    $("models-empty").hidden = list.length > 0;
  }

  function renderBudget(total, used, list) {
    const loaded = list.filter((m) => m.status !== "unloaded");
    $("budget-used").textContent = `${megabytes(used)} of ${megabytes(total)}`;
    $("budget-detail").textContent =
      `${Math.round(percent(used, total))}% · ${loaded.length} of ${list.length} model` +
      `${list.length === 1 ? "" : "s"} loaded`;
    const bar = $("budget-bar");
    bar.replaceChildren(
      ...loaded.map((m) => {
        const segment = el("span", `segment state-${m.status}`);
        segment.style.width = `${percent(m.vram_mb, total)}%`;
        segment.style.background = `var(--${stateColor(m.status)})`;
        segment.title = `${m.name}: ${megabytes(m.vram_mb)} (${m.status})`;
        return segment;
      }),
    );
    bar.setAttribute(
      "aria-label",
      `VRAM: ${megabytes(used)} of ${megabytes(total)} in use` +
        (loaded.length ? ` by ${loaded.map((m) => m.name).join(", ")}` : ""),
    );
  }

  function stateColor(state) {
    return ["loaded", "loading", "unloading"].includes(state) ? state : "unloaded";
  }

  function makeCard(name) {
    const root = $("model-template").content.firstElementChild.cloneNode(true);
    const q = (selector) => root.querySelector(selector);
    const card = {
      name,
      root,
      busy: null, // "load" or "unload" while its request is out
      model: null,
      log: null,
      stateEl: q(".state"),
      kind: q(".model-kind"),
      bar: q(".model-bar"),
      fill: q(".fill"),
      vramText: q(".vram-text"),
      inFlight: q(".in-flight"),
      queued: q(".queued"),
      lastUsed: q(".last-used"),
      loadCount: q(".load-count"),
      process: q(".process"),
      idle: q(".idle"),
      cooldown: q(".cooldown"),
      lastError: q(".last-error"),
      errorText: q(".error-text"),
      errorMore: q(".more"),
      message: q(".action-message"),
      load: q(".load"),
      unload: q(".unload"),
      forceUnload: q(".force-unload"),
      logsToggle: q(".logs-toggle"),
      logPane: q(".log-pane"),
      logStatus: q(".log-status"),
      logText: q(".log"),
    };
    root.dataset.model = name;
    q(".model-name").textContent = name;
    const paneId = `log-${Math.random().toString(36).slice(2)}`;
    card.logPane.id = paneId;
    card.logsToggle.setAttribute("aria-controls", paneId);
    card.logText.setAttribute("aria-label", `Log of ${name}`);
    card.load.setAttribute("aria-label", `Load ${name}`);
    card.unload.setAttribute("aria-label", `Unload ${name}`);
    card.forceUnload.setAttribute("aria-label", `Force unload ${name} (cuts its requests short)`);
    card.logsToggle.setAttribute("aria-label", `Logs of ${name}`);
    card.load.addEventListener("click", () => act(card, "load"));
    card.unload.addEventListener("click", () => act(card, "unload", false));
    card.forceUnload.addEventListener("click", () => act(card, "unload", true));
    card.logsToggle.addEventListener("click", () => toggleLogs(card));
    card.errorMore.addEventListener("click", () => {
      const open = card.lastError.classList.toggle("open");
      card.errorMore.setAttribute("aria-expanded", String(open));
      card.errorMore.textContent = open ? "Show less" : "Show all";
    });
    return card;
  }

  function updateCard(card, m, total) {
    card.model = m;
    const state = m.status;
    card.root.dataset.state = stateColor(state);
    card.stateEl.textContent = state;

    const kind = [`${m.backend} · ${m.model_type}`];
    if (m.aliases && m.aliases.length) kind.push(`aka ${m.aliases.join(", ")}`);
    if (m.pinned) kind.push("pinned");
    card.kind.textContent = kind.join(" · ");

    const share = percent(m.vram_mb, total);
    card.fill.style.width = `${share}%`;
    card.vramText.textContent = `${megabytes(m.vram_mb)} · ${share < 1 && share > 0 ? "<1" : Math.round(share)}%`;
    const holds = state === "unloaded" ? "needs" : "holds";
    card.bar.setAttribute(
      "aria-label",
      `${m.name} ${holds} ${megabytes(m.vram_mb)}, ${Math.round(share)}% of the ${megabytes(total)} VRAM budget`,
    );

    card.inFlight.textContent = String(m.in_flight ?? 0);
    card.queued.textContent = String(m.queued);
    card.lastUsed.textContent = ago(m.last_used);
    card.lastUsed.title = m.last_used ? new Date(m.last_used * 1000).toLocaleString() : "";
    card.loadCount.textContent = String(m.load_count ?? 0);
    card.process.textContent = m.pid ? `pid ${m.pid}` : "–";
    card.process.title = m.port ? `port ${m.port}` : "";
    card.idle.textContent = m.pinned
      ? "never (pinned)"
      : m.unload_after_seconds == null
        ? "never"
        : duration(m.unload_after_seconds);

    const coolingFor = m.cooldown_until ? m.cooldown_until - now() : 0;
    const failures = m.consecutive_failures || 0;
    if (coolingFor > 0) {
      card.cooldown.textContent =
        `Cooling down after ${failures} failed load${failures === 1 ? "" : "s"}: ` +
        `requests are refused for ${Math.ceil(coolingFor)} s more. "Load now" skips the wait.`;
      card.cooldown.hidden = false;
    } else if (failures > 0) {
      card.cooldown.textContent = `${failures} failed load${failures === 1 ? "" : "s"} in a row.`;
      card.cooldown.hidden = false;
    } else {
      card.cooldown.hidden = true;
    }
    const errorText = m.last_error ? `Last error: ${m.last_error}` : "";
    if (card.errorText.textContent !== errorText) card.errorText.textContent = errorText;
    card.lastError.hidden = !m.last_error;
    card.errorMore.hidden = errorText.length < 160;

    card.load.textContent = coolingFor > 0 ? "Load now" : "Load";
    card.load.disabled = card.busy !== null || state === "loaded" || state === "loading";
    card.unload.disabled = card.busy !== null || state === "unloaded";
    card.forceUnload.disabled = card.busy !== null || state === "unloaded";
    if (state === "unloaded") card.forceUnload.hidden = true;
  }

  // ------------------------------------------------------------ load and unload

  function setMessage(card, text, isError) {
    clearTimeout(card.messageTimer);
    // The card shows the model's last error in full; this is the short form.
    card.message.textContent = text.length > 100 ? `${text.slice(0, 99)}…` : text;
    card.message.title = text; // a long one is cut short; the whole text on hover
    card.message.className = `action-message${isError ? " error" : ""}`;
    card.message.hidden = !text;
    if (text && !isError) {
      card.messageTimer = setTimeout(() => {
        card.message.hidden = true;
      }, 6000);
    }
  }

  async function act(card, action, force) {
    if (card.busy) return;
    const model = card.model;
    const cooling = model && model.cooldown_until && model.cooldown_until > now();
    const body = { model: card.name };
    if (force || (action === "load" && cooling)) body.force = true;
    card.busy = action;
    card.forceUnload.hidden = true;
    setMessage(card, action === "load" ? `Loading ${card.name}…` : `Unloading ${card.name}…`);
    render();
    const started = performance.now();
    const request = fetch(`/admin/models/${action}`, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    // The load answers when the model is ready; show "loading" meanwhile.
    setTimeout(refreshNow, 150);
    try {
      const response = await request;
      const seconds = (performance.now() - started) / 1000;
      if (response.ok) {
        const result = await response.json();
        if (action === "load") setMessage(card, `Loaded in ${duration(seconds)}.`);
        else setMessage(card, result.unloaded ? "Unloaded." : "It was not loaded.");
      } else {
        const message = await errorMessage(response);
        if (response.status === 401 || response.status === 403) authProblem(response.status, message);
        setMessage(card, `${action === "load" ? "Load" : "Unload"} failed: ${message}`, true);
        // 409: requests are in flight; offer to cut them short.
        card.forceUnload.hidden = !(action === "unload" && response.status === 409);
      }
    } catch (_) {
      setMessage(card, "dynllm did not answer.", true);
    } finally {
      card.busy = null;
      refreshNow();
    }
  }

  // ------------------------------------------------------------ SSE over fetch

  /** Calls onEvent({event, data}) for each event of a text/event-stream body. */
  async function readEvents(body, onEvent) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // Line ends may be \r\n, \r or \n; a \r at the end of a chunk waits for
      // the next one (it may be the first half of \r\n).
      const held = buffer.endsWith("\r") ? "\r" : "";
      let text = (held ? buffer.slice(0, -1) : buffer).replace(/\r\n|\r/g, "\n");
      let end;
      while ((end = text.indexOf("\n\n")) >= 0) {
        const parsed = parseBlock(text.slice(0, end));
        text = text.slice(end + 2);
        if (parsed) onEvent(parsed);
      }
      buffer = text + held;
    }
  }

  function parseBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue; // comments: connected, keepalive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  /**
   * A stream that reconnects: ``open(signal)`` runs one connection and
   * returns the delay before the next try (null: do not retry).
   */
  function reconnecting(open) {
    let controller = null;
    let stopped = false;
    (async () => {
      while (!stopped) {
        controller = new AbortController();
        let delay;
        try {
          delay = await open(controller.signal);
        } catch (_) {
          delay = controller.signal.aborted ? 0 : 2000; // aborted: a restart
        }
        if (stopped || delay == null) return;
        if (delay > 0) await sleep(delay);
      }
    })();
    return {
      restart() {
        if (controller) controller.abort();
      },
      stop() {
        stopped = true;
        if (controller) controller.abort();
      },
    };
  }

  // ------------------------------------------------------------ the event feed

  function feedStatus(text, kind) {
    const status = $("events-status");
    status.textContent = text;
    status.className = `feed-status ${kind}`;
  }

  let feedFailures = 0;

  async function openEvents(signal) {
    if (blockedKey !== null && blockedKey === adminKey) {
      feedStatus("live feed needs an admin key", "down");
      return 2000;
    }
    let response;
    try {
      response = await fetch("/admin/events", {
        headers: authHeaders({ Accept: "text/event-stream" }),
        cache: "no-store",
        signal,
      });
    } catch (_) {
      if (signal.aborted) return 0;
      feedStatus("live feed disconnected; retrying…", "down");
      return FEED_RETRY_MS[Math.min(feedFailures++, FEED_RETRY_MS.length - 1)];
    }
    if (response.status === 401 || response.status === 403) {
      feedStatus("live feed needs an admin key", "down");
      return FEED_REFUSED_RETRY_MS; // a new key restarts it at once
    }
    if (!response.ok) {
      feedStatus(`live feed unavailable (${response.status})`, "down");
      return FEED_RETRY_MS[Math.min(feedFailures++, FEED_RETRY_MS.length - 1)];
    }
    feedFailures = 0;
    feedStatus("live", "live");
    if (!$("events").children.length) {
      $("events-empty").textContent = "No lifecycle events since this page opened.";
    }
    await readEvents(response.body, (event) => {
      if (event.event !== "lifecycle") return;
      try {
        addEvent(JSON.parse(event.data));
      } catch (_) {
        // A malformed event is skipped; the next ones still show.
      }
    });
    feedStatus("live feed ended; reconnecting…", "down");
    return 1000;
  }

  function addEvent(e) {
    const item = el("li");
    const at = e.at ? new Date(e.at * 1000) : new Date();
    const time = el("time", null, at.toLocaleTimeString());
    time.dateTime = at.toISOString();
    const what = el("span", "what");
    what.append(el("strong", null, e.model), ` ${e.from} → `, el("span", `to-${stateColor(e.to)}`, e.to));
    const why = [String(e.reason || "").replace(/_/g, " ")];
    if (e.detail) why.push(e.detail);
    if (e.duration_s != null) why.push(duration(e.duration_s));
    const reason = el("span", "why", why.filter(Boolean).join(" · "));
    reason.title = reason.textContent;
    item.append(time, what, reason);
    const list = $("events");
    list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
    $("events-empty").hidden = true;
    refreshNow(); // the state just changed: show it now, not at the next poll
  }

  // ------------------------------------------------------------ log panes

  function toggleLogs(card) {
    const open = card.logPane.hidden;
    card.logPane.hidden = !open;
    card.logsToggle.setAttribute("aria-expanded", String(open));
    card.logsToggle.textContent = open ? "Hide logs" : "Logs";
    if (open) {
      card.log = reconnecting((signal) => openLog(card, signal));
    } else if (card.log) {
      card.log.stop();
      card.log = null;
    }
  }

  function setLogLines(card, lines) {
    const pre = card.logText;
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    pre.textContent = lines.join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function logStatus(card, text, kind) {
    card.logStatus.textContent = text;
    card.logStatus.className = `log-status ${kind || "muted"}`;
  }

  async function openLog(card, signal) {
    const url = `/admin/models/${encodeURIComponent(card.name)}/logs?follow=true`;
    const response = await fetch(url, {
      headers: authHeaders({ Accept: "text/event-stream" }),
      cache: "no-store",
      signal,
    });
    if (!response.ok) {
      logStatus(card, `log unavailable (${response.status}): ${await errorMessage(response)}`);
      return 5000;
    }
    logStatus(card, "live log", "live");
    const lines = []; // the stream starts with the tail again on each connection
    let pending = false;
    await readEvents(response.body, (event) => {
      try {
        lines.push(JSON.parse(event.data).line);
      } catch (_) {
        lines.push(event.data);
      }
      if (lines.length > MAX_LOG_LINES) lines.splice(0, lines.length - MAX_LOG_LINES);
      // One DOM update per frame, however many lines arrived in it.
      if (!pending) {
        pending = true;
        requestAnimationFrame(() => {
          pending = false;
          setLogLines(card, lines);
        });
      }
    });
    logStatus(card, "log stream ended; reconnecting…");
    return 1000;
  }

  // ------------------------------------------------------------ start

  const events = reconnecting(openEvents);

  async function showVersion() {
    try {
      const response = await fetch("/health", { cache: "no-store" });
      if (response.ok) $("version").textContent = `v${(await response.json()).version}`;
    } catch (_) {
      // The version is decoration; the models poll reports a dead server.
    }
  }

  showKeyState();
  showVersion();
  refreshNow();
  setInterval(refreshNow, POLL_MS);
  setInterval(render, 1000); // relative times and cooldown countdowns
})();

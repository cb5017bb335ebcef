// The operator console (GET /console): this node and its rooms, live from
// GET /console/events (server-sent events read with fetch, so the admin key goes in a
// header), a room's members and last messages, and the rooms API's operator actions,
// each after a confirmation. The admin key is typed once and kept in sessionStorage.
import { parseFrame } from "/static/trio-chat.js";

const KEY_ITEM = "trio-chat-admin-key";
const STALE_AFTER = 5000;     // no update for this long: reconnect
const SPARK_POINTS = 120;     // two minutes of "messages in/s"
const MESSAGES_SHOWN = 30;
const $ = (id) => document.getElementById(id);

let key = sessionStorage.getItem(KEY_ITEM) || "";
let feed = null;              // the running feed's AbortController
let selected = null;          // {id, lastId, online} of the room shown, ids as strings
const spark = [];

function headers(extra = {}) {
  return key ? { ...extra, "X-Admin-Key": key } : extra;
}

function setState(state, text = state) {
  $("state").dataset.state = state;
  $("state").textContent = text;
}

function toast(text, error = false) {
  const t = $("toast");
  t.textContent = text;
  t.className = error ? "show error" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ""; }, 3500);
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(e.dataset, value);
    else e[name] = value;
  }
  e.append(...children);
  return e;
}

// ---- the admin key ------------------------------------------------------------------

function needKey(detail) {
  feed?.abort();
  feed = null;
  setState("key", "admin key needed");
  $("login").hidden = false;
  $("forget").hidden = true;
  $("login-error").textContent = key ? `Refused: ${detail || "wrong key"}` : "";
  $("key").focus();
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem(KEY_ITEM, key);
  $("key").value = "";
  start();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  key = "";
  needKey();
});

// ---- the rooms API --------------------------------------------------------------------

class ApiError extends Error {}

// `body` is JSON text (so 64-bit ids go out exactly), or undefined.
async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = body;
  const res = await fetch(path, init);
  const data = await res.text().then((t) => (t ? parseFrame(t) : null)).catch(() => null);
  if (res.status === 401) needKey(data?.detail);
  if (!res.ok) throw new ApiError(data?.detail || `${res.status} ${res.statusText}`);
  return data;
}

const intText = (v) => (/^-?\d+$/.test(String(v)) ? String(v) : null);

// ---- the live feed --------------------------------------------------------------------

async function runFeed(control) {
  let attempt = 0;
  while (!control.signal.aborted) {
    setState(attempt ? "reconnecting" : "connecting", attempt ? "reconnecting…" : "connecting…");
    const stale = new AbortController();
    const onAbort = () => stale.abort();
    control.signal.addEventListener("abort", onAbort);
    let timer = setTimeout(() => stale.abort(), STALE_AFTER);
    try {
      const res = await fetch("/console/events", { headers: headers({ Accept: "text/event-stream" }),
                                                  cache: "no-store", signal: stale.signal });
      if (res.status === 401 || res.status === 403) {
        const data = await res.json().catch(() => null);
        needKey(data?.detail);
        return;
      }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      $("login").hidden = true;
      $("forget").hidden = !key;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trimStart()).join("\n");
          if (/^event: ?stats$/m.test(event) && data) {
            clearTimeout(timer);
            timer = setTimeout(() => stale.abort(), STALE_AFTER);
            attempt = 0;
            setState("live");
            render(parseFrame(data));
          }
        }
      }
    } catch {
      // The network, the server going away, or no update in time: try again below.
    } finally {
      clearTimeout(timer);
      control.signal.removeEventListener("abort", onAbort);
    }
    if (control.signal.aborted) return;
    attempt += 1;
    const delay = Math.min(10000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
    setState("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s…`);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

function start() {
  feed?.abort();
  feed = new AbortController();
  runFeed(feed);
}

// ---- rendering --------------------------------------------------------------------

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const rate = (r) => (r >= 10 ? r.toFixed(0) : r.toFixed(1));

function render(u) {
  $("node-name").textContent = u.node.id;
  $("n-connections").textContent = u.connections.toLocaleString();
  $("n-rooms").textContent = u.rooms_live.toLocaleString();
  $("n-uptime").textContent = duration(u.node.uptime);
  $("n-in").textContent = rate(u.received_rate);
  $("n-out").textContent = rate(u.delivered_rate);
  $("n-lag").textContent = u.store_lag.toLocaleString();
  $("n-worker").textContent = u.node.worker || "single process";
  $("n-host").textContent = `${u.node.host} · ${u.node.pid}`;
  $("n-errors").textContent = String(u.unexpected_errors);
  drawSpark(u.received_rate);

  $("rooms-count").textContent = u.rooms.length < u.rooms_live
    ? `${u.rooms.length} of ${u.rooms_live}` : String(u.rooms_live);
  $("rooms-empty").hidden = u.rooms.length > 0;
  const top = Math.max(1, ...u.rooms.map((r) => r.rate));
  $("room-rows").replaceChildren(...u.rooms.map((r) => {
    const bar = el("span");
    bar.style.width = `${Math.round((r.rate / top) * 90)}px`;
    const row = el("tr", { dataset: { room: r.id }, className: selected?.id === r.id ? "selected" : "" },
      el("td", {}, `#${r.id}`),
      el("td", { className: "online" }, String(r.online)),
      el("td", { className: "connections" }, String(r.connections)),
      el("td", { className: "rate" }, el("div", { className: "bar" }, bar, el("b", {}, rate(r.rate)))));
    return row;
  }));
  const shown = selected && u.rooms.find((r) => r.id === selected.id);
  if (shown && (shown.last_id !== selected.lastId || shown.online !== selected.online)) {
    selected.lastId = shown.last_id;
    selected.online = shown.online;
    loadRoom();
  }
}

function drawSpark(value) {
  spark.push(value);
  if (spark.length > SPARK_POINTS) spark.shift();
  const top = Math.max(1, ...spark);
  const step = 120 / (SPARK_POINTS - 1);
  const x0 = 120 - (spark.length - 1) * step;
  const points = spark.map((v, i) => `${(x0 + i * step).toFixed(1)},${(39 - (v / top) * 36).toFixed(1)}`);
  const svg = $("spark");
  svg.querySelector("polyline").setAttribute("points", points.join(" "));
  svg.querySelector("polygon").setAttribute("points",
    `${x0.toFixed(1)},40 ${points.join(" ")} 120,40`);
}

// ---- one room ---------------------------------------------------------------------

$("room-rows").addEventListener("click", (e) => {
  const row = e.target.closest("tr[data-room]");
  if (!row) return;
  selected = { id: row.dataset.room, lastId: null, online: null };
  for (const r of $("room-rows").children) r.classList.toggle("selected", r === row);
  $("room-none").hidden = true;
  $("room-detail").hidden = false;
  $("room-title").textContent = `#${selected.id}`;
  $("room-private").hidden = true;
  $("members").replaceChildren();
  $("messages").replaceChildren();
  api("GET", `/rooms/${selected.id}`).then((room) => {
    if (room && String(room.id) === selected?.id) {
      $("room-title").textContent = room.name ? `${room.name} (#${room.id})` : `#${room.id}`;
      $("room-private").hidden = !room.private;
    }
  }).catch(() => {});
  loadRoom();
});

let loading = null;

async function loadRoom() {
  if (loading) { loading.again = true; return; }
  loading = { again: false };
  try {
    do {
      loading.again = false;
      const id = selected.id;
      const [members, page] = await Promise.all([
        api("GET", `/rooms/${id}/members`),
        api("GET", `/rooms/${id}/messages?limit=${MESSAGES_SHOWN}`)]);
      if (selected?.id !== id) continue;
      showMembers(id, members);
      showMessages(id, page.messages);
    } while (loading.again);
  } catch (err) {
    toast(`Could not load the room: ${err.message}`, true);
  } finally {
    loading = null;
  }
}

function showMembers(room, members) {
  $("members-count").textContent = `· ${members.online}`;
  $("members").replaceChildren(...members.members.map((author) => el("li",
    { dataset: { author: String(author) } }, `#${author}`,
    el("button", { className: "small kick", type: "button", onclick: () => kick(room, author) }, "Kick"),
    el("button", { className: "small danger ban", type: "button", onclick: () => ban(room, author) }, "Ban"))));
  if (!members.members.length) $("members").append(el("li", { className: "empty" }, "nobody"));
}

function showMessages(room, messages) {
  $("messages").replaceChildren(...messages.map((m) => {
    const when = new Date(m.received_at || m.create_at);
    const deleted = Boolean(m.deleted_at);
    const content = deleted ? "deleted" : m.message_type === "chat_img" ? `[image] ${m.content}` : m.content;
    return el("li", { className: deleted ? "deleted" : "", dataset: { id: String(m.id) } },
      el("span", { className: "meta" },
         `#${m.id} · author #${m.author_id} · ${when.toLocaleString()}${m.edited_at ? " · edited" : ""}`),
      el("span", { className: "content" }, content),
      deleted ? "" : el("button", { className: "small danger delete", type: "button",
                                    onclick: () => deleteMessage(room, m) }, "Delete"));
  }));
  if (!messages.length) $("messages").append(el("li", { className: "empty" }, "no messages"));
}

// ---- operator actions, each confirmed ---------------------------------------------

function field(label, name, props = {}) {
  return el("label", {}, label, el("input", { name, type: "text", ...props }));
}

// The answer of a dialog closed whose close event has not arrived yet.
let answerPending = null;

// Shows the dialog; resolves with its fields' values, or null if cancelled.
function confirmAction(title, text, okLabel, fields = []) {
  const dialog = $("confirm");
  // The close event comes a moment after the dialog closes: a dialog reopened before
  // then is answered first, from its own button and fields, so a cancelled action is
  // never done by the next one's confirmation.
  answerPending?.();
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-fields").replaceChildren(...fields);
  $("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    const onClose = () => {
      // A previous dialog's late close event, while this one is open: not its answer.
      if (dialog.open) return;
      dialog.removeEventListener("close", onClose);
      answerPending = null;
      if (dialog.returnValue !== "ok") { resolve(null); return; }
      const values = {};
      for (const input of $("confirm-fields").querySelectorAll("input")) {
        values[input.name] = input.type === "checkbox" ? input.checked : input.value.trim();
      }
      resolve(values);
    };
    answerPending = onClose;
    dialog.addEventListener("close", onClose);
  });
}

async function act(what, request) {
  try {
    await request();
    toast(what);
    if (selected) loadRoom();
  } catch (err) {
    toast(`Failed: ${err.message}`, true);
  }
}

async function kick(room, author) {
  const v = await confirmAction(`Kick #${author}?`, `Their connections to room #${room} close (4004); they may join again.`,
                                "Kick", [field("Reason (optional)", "reason", { maxLength: 500 })]);
  if (v) act(`Kicked #${author}`, () => api("POST", `/rooms/${room}/kick`,
    `{"author_id": ${author}, "reason": ${JSON.stringify(v.reason)}}`));
}

async function ban(room, author) {
  const v = await confirmAction(`Ban #${author}?`, `Their connections to room #${room} close (4005) and they cannot join again until the ban ends.`,
                                "Ban", [field("Reason (optional)", "reason", { maxLength: 500 }),
                                        field("Duration in seconds (empty: for good)", "duration", { type: "number", min: 1 })]);
  if (!v) return;
  const duration = v.duration ? Number(v.duration) : null;
  act(`Banned #${author}`, () => api("POST", `/rooms/${room}/ban`,
    `{"author_id": ${author}, "reason": ${JSON.stringify(v.reason)}, "duration": ${JSON.stringify(duration)}}`));
}

async function deleteMessage(room, m) {
  const v = await confirmAction(`Delete message #${m.id}?`,
                                `Members see it deleted; the stored message keeps its id with empty content. "${String(m.content).slice(0, 120)}"`, "Delete");
  if (v) act(`Deleted message #${m.id}`, () => api("DELETE", `/rooms/${room}/messages/${m.id}`));
}

$("delete-room").addEventListener("click", async () => {
  const room = selected?.id;
  if (!room) return;
  const purge = el("input", { name: "purge", type: "checkbox" });
  const v = await confirmAction(`Delete room #${room}?`, "Every member, on every node, is closed with 4003.", "Delete room",
                                [el("label", { className: "check" }, purge, "Also delete its history and images")]);
  if (v) act(`Deleted room #${room}`, () => api("DELETE", `/rooms/${room}?purge=${v.purge}`));
});

$("announce").addEventListener("submit", async (e) => {
  e.preventDefault();
  const room = selected?.id;
  const form = e.target;
  const content = form.content.value;
  const author = intText(form.author.value.trim() || "0");
  if (!room || !content.trim()) return;
  if (author === null) { toast("The author id must be an integer", true); return; }
  const v = await confirmAction(`Announce in room #${room}?`, `As author #${author}: "${content.slice(0, 200)}"`, "Announce");
  if (!v) return;
  const body = `{"message_type": "chat_txt", "author_id": ${author}, "content": ${JSON.stringify(content)}}`;
  act("Announced", async () => {
    await api("POST", `/rooms/${room}/messages`, body);
    form.content.value = "";
  });
});

start();

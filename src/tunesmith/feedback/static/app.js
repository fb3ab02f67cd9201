// The judging page: one pair (or one response to rate) at a time, keys 1-4 (1-5) or the mouse,
// U to undo. Everything the model wrote is placed with textContent, so it stays text.
"use strict";

const VERDICTS = {
  pair: [["a", "A is better"], ["b", "B is better"], ["tie", "Tie"], ["both_bad", "Both bad"]],
  rate: [[1, "1 bad"], [2, "2"], [3, "3"], [4, "4"], [5, "5 great"]],
};
const NAME_KEY = "tunesmith.judge";
const $ = (id) => document.getElementById(id);

let judge = localStorage.getItem(NAME_KEY) || "";
let mode = null;
let current = null; // the item shown: {id, conversation, responses}
let busy = false;

function say(message, isError) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

function showProgress(p) {
  let line = `${p.judged} of ${p.target} judged · you: ${p.mine}`;
  if (p.generating) line += ` · generating: ${p.ready + p.skipped} of ${p.total} ready`;
  if (p.skipped) line += ` · ${p.skipped} skipped (identical or empty responses)`;
  if (p.error) line += ` · ${p.error}`;
  $("progress").textContent = line;
  $("undo").disabled = !p.can_undo;
}

function buildButtons() {
  const box = $("buttons");
  box.replaceChildren();
  VERDICTS[mode].forEach(([value, label], i) => {
    const button = el("button", "verdict", `${i + 1} · ${label}`);
    button.type = "button";
    button.dataset.verdict = String(value);
    button.addEventListener("click", () => submit(value));
    box.appendChild(button);
  });
  $("last-key").textContent = String(VERDICTS[mode].length);
  $("better-box").hidden = mode !== "pair";
  $("responses-title").textContent = mode === "pair" ? "Which response is better?" : "How good is this response? (1-5)";
}

function showItem(item) {
  const changed = (item && item.id) !== (current && current.id);
  current = item;
  if (!item) {
    $("task").hidden = true;
    $("waiting").hidden = false;
    return;
  }
  $("waiting").hidden = true;
  $("task").hidden = false;
  if (!changed) return; // keep what the person is typing
  const conversation = $("conversation");
  conversation.replaceChildren();
  for (const message of item.conversation) {
    const box = el("div", "msg");
    box.appendChild(el("span", "role", message.role));
    box.appendChild(el("div", "content", message.content));
    conversation.appendChild(box);
  }
  const responses = $("responses");
  responses.replaceChildren();
  item.responses.forEach((text, i) => {
    const box = el("div", "response");
    box.id = `response-${"ab"[i]}`;
    if (item.responses.length > 1) box.appendChild(el("h3", "", "AB"[i]));
    box.appendChild(el("div", "response-text", text));
    responses.appendChild(box);
  });
  $("better").value = "";
}

function showState(state, waitingText) {
  if (mode !== state.mode) {
    mode = state.mode;
    buildButtons();
  }
  showProgress(state.progress);
  const p = state.progress;
  $("waiting-text").textContent = waitingText || (p.generating || p.ready + p.skipped < p.total
    ? "Generating responses… the next pair appears here by itself."
    : p.judged >= p.target ? "All done: every pair is judged. Thank you!"
    : "Nothing free for you right now (the rest is with other judges, or judged by you already).");
  showItem(state.item);
}

async function refresh() {
  if (!judge || busy) return;
  try {
    showState(await api("api/next", { judge }));
  } catch (e) {
    say(e.message, true);
  }
}

async function submit(verdict) {
  if (!current || busy) return;
  busy = true;
  const body = { judge, item: current.id };
  if (mode === "pair") {
    body.verdict = verdict;
    const better = $("better").value.trim();
    if (better) body.better = better;
  } else {
    body.score = verdict;
  }
  try {
    const state = await api("api/judge", body);
    const label = VERDICTS[mode].find(([v]) => v === verdict)[1];
    say(`Saved: ${label}. Press U to undo.`);
    showState(state);
  } catch (e) {
    say(e.message, true);
    busy = false;
    if (e.status === 409) await refresh();
  } finally {
    busy = false;
  }
}

async function undo() {
  if (busy) return;
  busy = true;
  try {
    const state = await api("api/undo", { judge });
    say(state.undone ? "Undone: your last judgement was removed. Judge it again." : "Nothing to undo.");
    current = null; // show the returned pair afresh
    showState(state);
  } catch (e) {
    say(e.message, true);
  } finally {
    busy = false;
  }
}

function askName() {
  $("name-form").hidden = false;
  $("who").hidden = true;
  $("task").hidden = true;
  $("name").value = judge;
  $("name").focus();
}

function start() {
  $("name-form").hidden = true;
  $("who").hidden = false;
  $("who-name").textContent = judge;
  current = null;
  refresh();
}

document.addEventListener("keydown", (event) => {
  const typing = event.target.matches("textarea, input");
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (!judge || event.altKey || event.metaKey || event.ctrlKey || !mode) return;
  if (event.key === "u" || event.key === "U") {
    event.preventDefault();
    undo();
    return;
  }
  const k = Number(event.key);
  if (Number.isInteger(k) && k >= 1 && k <= VERDICTS[mode].length) {
    event.preventDefault();
    submit(VERDICTS[mode][k - 1][0]);
  }
});

$("name-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  judge = name;
  localStorage.setItem(NAME_KEY, judge);
  start();
});
$("change-name").addEventListener("click", askName);
$("undo").addEventListener("click", undo);
$("summary-link").href = withToken("summary");

if (judge) start(); else askName();
setInterval(refresh, 3000); // progress, new pairs as they are generated, and keeps this pair ours

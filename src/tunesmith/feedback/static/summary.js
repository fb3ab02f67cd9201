// The summary page: judgements per person, agreement, and how the compared models fare.
"use strict";

const $ = (id) => document.getElementById(id);
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

function fill(table, header, rows) {
  const head = table.querySelector("thead");
  if (header) {
    const tr = el("tr");
    header.forEach((h) => tr.appendChild(el("th", "", h)));
    head.replaceChildren(tr);
  }
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = el("tr");
    row.forEach((cell) => tr.appendChild(el("td", "", String(cell))));
    body.appendChild(tr);
  }
}

async function load() {
  try {
    const s = await api("api/summary");
    fill($("judges"), null, s.judges.map((j) => [
      j.judge, j.judgements,
      Object.entries(j.verdicts).map(([k, v]) => `${k}: ${v}`).join(", "),
    ]));
    const a = s.agreement;
    $("agreement").textContent = a.comparisons
      ? `${a.items} items judged by more than one person; ${a.agree} of ${a.comparisons} comparisons agree (${pct(a.rate)}).`
      : "No item has been judged by two people yet (start with --judges-per-pair 2 to measure agreement).";
    if (s.mode === "rate") {
      $("models-title").textContent = "Mean score per model";
      fill($("models"), ["model", "rated", "mean score"], s.models.map((m) => [m.model, m.n, m.mean_score.toFixed(2)]));
    } else {
      $("models-title").textContent = "Win rate between models (--against; ties and both-bad count half)";
      fill($("models"), ["model 1", "model 2", "judged", "wins 1", "wins 2", "ties", "both bad", "identical (skipped)", "win rate 1", "win rate 2"],
        s.matches.map((m) => [m.models[0], m.models[1], m.judged, m.wins[0], m.wins[1], m.ties,
          m.both_bad, m.identical, pct(m.win_rate[0]), pct(m.win_rate[1])]));
    }
    $("status").textContent = `${s.judgements} judgements in all.`;
  } catch (e) {
    $("status").textContent = e.message;
  }
}

$("judge-link").href = withToken(".");
load();
setInterval(load, 5000);

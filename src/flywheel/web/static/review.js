// Flywheel review: keyboard-first decisions on the server-rendered grid. No framework, no build.
// Every decision is a POST to /review carrying the page's CSRF secret; the server appends a review row.
// Undo re-posts each image's previous decision (or 'cleared' when it had none): history is never erased.
(() => {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const cards = Array.from(document.querySelectorAll(".card"));
  const byId = new Map(cards.map((c) => [c.dataset.id, c]));
  const selected = new Set();
  const undoStack = []; // each entry: [{id, prev}] for one action
  const DECIDED = ["accepted", "rejected", "skipped"];
  let pos = 0;
  let queue = Promise.resolve();

  function toast(text, isError = false) {
    const el = document.getElementById("toast");
    el.textContent = text;
    el.classList.toggle("error", isError);
    el.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { el.hidden = true; }, isError ? 6000 : 1800);
  }

  function focusAt(i) {
    if (!cards.length) return;
    pos = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c, j) => c.classList.toggle("focused", j === pos));
    cards[pos].scrollIntoView({ block: "nearest" });
    if (!overlay().hidden) showOverlay();
  }

  function columns() {
    // Cards in the first row share its top edge: that is how many columns the grid has now.
    const top = cards[0] ? cards[0].offsetTop : 0;
    return Math.max(1, cards.filter((c) => c.offsetTop === top).length);
  }

  function setState(id, decision) {
    const card = byId.get(String(id));
    if (!card) return;
    const state = decision === "cleared" ? "" : decision;
    card.dataset.review = state;
    card.className = card.className.replace(/\breview-\S+/g, "").trim() + " review-" + (state || "none");
    card.querySelector('[data-role="decision"]').textContent = state;
  }

  async function post(ids, decision, reason) {
    const res = await fetch("/review", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ image_ids: ids.map(Number), decision, reason: reason || null }),
    });
    if (!res.ok) {
      let msg = res.status + " " + res.statusText;
      try { const body = await res.json(); msg = body.error + (body.hint ? " (" + body.hint + ")" : ""); } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
  }

  async function refreshCounts() {
    const params = new URLSearchParams(location.search);
    params.set("limit", "0"); // counts only
    const res = await fetch("/api/items?" + params.toString(), { credentials: "same-origin" });
    if (!res.ok) return;
    const { counts } = await res.json();
    for (const [key, value] of Object.entries(counts)) {
      const el = document.querySelector('[data-count="' + key + '"]');
      if (el) el.textContent = value;
    }
    if (counts.remaining === 0 && counts.total > 0) toast("All done: every image here has a decision.");
  }

  // Requests run one after another in key-press order (fast typing is queued, never dropped), so each
  // action sees the state the previous one left and the undo stack stays in order.
  function run(task) {
    queue = queue.then(task).catch((err) => toast("Not saved: " + err.message, true));
    return queue;
  }

  function decide(ids, decision, advance) {
    if (advance) focusAt(pos + 1); // move on at once; the request follows in the queue
    return run(async () => {
      const prev = ids.map((id) => ({ id, prev: byId.get(id).dataset.review }));
      await post(ids, decision);
      ids.forEach((id) => setState(id, decision));
      undoStack.push(prev);
      await refreshCounts();
    });
  }

  function undo() {
    return run(async () => {
      const last = undoStack.pop();
      if (!last) { toast("Nothing to undo"); return; }
      const groups = new Map(); // previous decision -> ids
      for (const { id, prev } of last) {
        const back = DECIDED.includes(prev) ? prev : "cleared";
        groups.set(back, [...(groups.get(back) || []), id]);
      }
      for (const [decision, ids] of groups) {
        await post(ids, decision, "undo");
        ids.forEach((id) => setState(id, decision));
      }
      focusAt(cards.indexOf(byId.get(last[0].id)));
      toast("Undone");
      await refreshCounts();
    });
  }

  function toggleSelected(card) {
    const id = card.dataset.id;
    if (selected.has(id)) selected.delete(id); else selected.add(id);
    card.classList.toggle("selected", selected.has(id));
    card.querySelector("input.select").checked = selected.has(id);
    document.getElementById("selected-count").textContent = selected.size;
  }

  function clearSelection() {
    for (const id of [...selected]) toggleSelected(byId.get(id));
  }

  function bulk(decision) {
    if (!selected.size) { toast("Select images with x first"); return; }
    const ids = [...selected];
    clearSelection();
    decide(ids, decision, false).then(() => {
      if (ids.every((id) => byId.get(id).dataset.review === decision)) toast(decision + ": " + ids.length + " image(s)");
    });
  }

  const overlay = () => document.getElementById("overlay");

  function showOverlay() {
    const card = cards[pos];
    if (!card) return;
    const pics = document.getElementById("overlay-pictures");
    pics.replaceChildren();
    // The focused image at full size beside its parents, built from the card (text only, never HTML).
    card.querySelectorAll(".pictures figure").forEach((fig) => {
      const out = document.createElement("figure");
      const img = document.createElement("img");
      img.src = fig.querySelector("a").getAttribute("href");
      img.alt = fig.querySelector("img").alt;
      const cap = document.createElement("figcaption");
      cap.textContent = fig.querySelector("figcaption").textContent;
      out.append(img, cap);
      pics.append(out);
    });
    const text = (sel) => card.querySelector(sel).textContent.replace(/\s+/g, " ").trim();
    const decision = card.dataset.review;
    document.getElementById("overlay-title").textContent = [text(".pick"), text(".meta"), text(".badge[class*=verdict-]"),
      decision ? "you: " + decision : "not decided"].join(" · ");
    const reason = card.querySelector(".reason");
    document.getElementById("overlay-reason").textContent = reason ? reason.textContent : "";
    overlay().hidden = false;
  }

  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target.closest && ev.target.closest("input, select, textarea")) return;
    const card = cards[pos];
    const keys = {
      a: () => card && decide([card.dataset.id], "accepted", true),
      r: () => card && decide([card.dataset.id], "rejected", true),
      s: () => card && decide([card.dataset.id], "skipped", true),
      A: () => bulk("accepted"), R: () => bulk("rejected"), S: () => bulk("skipped"),
      u: undo,
      x: () => card && toggleSelected(card),
      j: () => focusAt(pos + 1), k: () => focusAt(pos - 1),
      ArrowRight: () => focusAt(pos + 1), ArrowLeft: () => focusAt(pos - 1),
      ArrowDown: () => focusAt(pos + columns()), ArrowUp: () => focusAt(pos - columns()),
      Enter: () => (overlay().hidden ? showOverlay() : (overlay().hidden = true)),
      Escape: () => { if (!overlay().hidden) overlay().hidden = true; else clearSelection(); },
    };
    const action = keys[ev.key];
    if (!action) return;
    ev.preventDefault();
    action();
  }

  document.addEventListener("keydown", onKey);
  overlay().addEventListener("click", () => { overlay().hidden = true; });
  cards.forEach((card, i) => {
    card.addEventListener("click", (ev) => { if (!ev.target.closest("a, button, input")) focusAt(i); });
    card.querySelector("input.select").addEventListener("change", () => { toggleSelected(card); focusAt(i); });
    // The buttons work without this script (a form POST); with it they stay on the page and can be undone.
    card.querySelector("form.actions").addEventListener("submit", (ev) => {
      ev.preventDefault();
      focusAt(i);
      decide([card.dataset.id], ev.submitter.value, true);
    });
  });
  // Filters apply as soon as a menu changes.
  document.querySelectorAll(".filters select").forEach((s) => s.addEventListener("change", () => s.form.submit()));
  focusAt(0);
  document.body.dataset.ready = "1"; // tests wait for this before pressing keys
})();

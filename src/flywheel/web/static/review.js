// Flywheel review: keyboard-first decisions on the server-rendered grid. No framework, no build.
// Every decision is a POST to /review carrying the page's CSRF secret; the server appends a review row
// per image and answers with each image's previous decision, which is what undo re-posts ('cleared'
// when there was none): history is never erased. Captions are edited inline (POST /caption).
(() => {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const grid = document.getElementById("grid");
  if (!grid) return;
  const filterQuery = grid.dataset.filter;
  let matching = Number(grid.dataset.matching || 0); // images the whole filter selects (all pages)
  const cards = Array.from(document.querySelectorAll(".card"));
  const byId = new Map(cards.map((c) => [c.dataset.id, c]));
  const selected = new Set();
  let allInFilter = false; // "select all" picked every image of the filter, not just this page
  let anchor = null; // where a range selection starts (the last card toggled, or where shift-moving began)
  let rangeBase = null; // the selection before the current range, which the range is added to
  const undoStack = []; // one entry per action: [{id, prev}]
  const DECIDED = ["accepted", "rejected", "skipped"];
  let pos = 0;
  let queue = Promise.resolve();

  const $ = (id) => document.getElementById(id);
  const overlay = () => $("overlay");
  const fmt = (n) => Number(n).toLocaleString("en");

  function toast(text, isError = false) {
    const el = $("toast");
    el.textContent = text;
    el.classList.toggle("error", isError);
    el.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { el.hidden = true; }, isError ? 6000 : 2200);
  }

  function focusAt(i, scroll = true) {
    if (!cards.length) return;
    const next = Math.max(0, Math.min(cards.length - 1, i));
    if (i > cards.length - 1 && document.querySelector('a[rel="next"]')) toast("Last image of this page: n for the next page");
    cards[pos].classList.remove("focused");
    pos = next;
    cards[pos].classList.add("focused");
    if (scroll) cards[pos].scrollIntoView({ block: "nearest" });
    if (!overlay().hidden) showOverlay();
  }

  function columns() {
    // Cards in the first row share its top edge: that is how many columns the grid has now.
    const top = cards[0] ? cards[0].offsetTop : 0;
    return Math.max(1, cards.filter((c) => c.offsetTop === top).length);
  }

  function setState(id, decision) {
    const card = byId.get(String(id));
    if (!card) return; // decided through the filter, but on another page
    const state = decision === "cleared" ? "" : decision;
    card.dataset.review = state;
    card.className = card.className.replace(/\breview-\S+/g, "").trim() + " review-" + (state || "none");
    card.querySelector('[data-role="decision"]').textContent = state;
  }

  async function post(url, body) {
    const res = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) {
      throw new Error(data && data.error ? data.error + (data.hint ? " (" + data.hint + ")" : "") : res.status + " " + res.statusText);
    }
    return data;
  }

  async function refreshCounts() {
    const res = await fetch("/api/items?" + filterQuery + "&limit=0", { credentials: "same-origin" });
    if (!res.ok) return;
    const { counts } = await res.json();
    matching = counts.matching;
    for (const [key, value] of Object.entries(counts)) {
      document.querySelectorAll('[data-count="' + key + '"]').forEach((el) => { el.textContent = value; });
    }
    if (counts.remaining === 0 && counts.total > 0) toast("All done: every image here has a decision.");
  }

  // Requests run one after another in key-press order (fast typing is queued, never dropped), so each
  // action sees the state the previous one left and the undo stack stays in order.
  function run(task) {
    queue = queue.then(task).catch((err) => toast("Not saved: " + err.message, true));
    return queue;
  }

  function remember(previous) {
    undoStack.push(Object.entries(previous).map(([id, prev]) => ({ id, prev })));
  }

  function decide(ids, decision, advance) {
    if (advance) focusAt(pos + 1); // move on at once; the request follows in the queue
    return run(async () => {
      const res = await post("/review", { image_ids: ids.map(Number), decision, reason: null });
      ids.forEach((id) => setState(id, decision));
      remember(res.previous);
      await refreshCounts();
    });
  }

  async function decideFilter(decision) {
    await queue; // the count must include every decision already on its way
    const verb = { accepted: "Accept", rejected: "Reject", skipped: "Skip" }[decision];
    if (!matching) { toast("No images in this filter"); return; }
    const count = matching;
    if (!(await confirmDialog(verb + " all " + fmt(count) + " images in this filter?", verb + " " + fmt(count)))) return;
    clearSelection();
    return run(async () => {
      const filter = Object.fromEntries(new URLSearchParams(filterQuery));
      const res = await post("/review", { filter, expected: count, decision, reason: null });
      Object.keys(res.previous).forEach((id) => setState(id, decision));
      remember(res.previous);
      toast(decision + ": " + fmt(res.recorded) + " image(s) (u undoes)");
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
        await post("/review", { image_ids: ids.map(Number), decision, reason: "undo" });
        ids.forEach((id) => setState(id, decision));
      }
      const back = cards.indexOf(byId.get(String(last[0].id)));
      if (back >= 0) focusAt(back);
      toast("Undone" + (last.length > 1 ? ": " + fmt(last.length) + " images" : ""));
      await refreshCounts();
    });
  }

  // --- selection: x toggles, shift+click / shift+arrows select a range, X selects the whole filter ---
  function setSelected(card, on) {
    const id = card.dataset.id;
    if (on) selected.add(id); else selected.delete(id);
    card.classList.toggle("selected", on);
    card.querySelector("button.select").setAttribute("aria-pressed", on ? "true" : "false");
  }

  function showSelected() {
    $("selected-count").textContent = allInFilter ? "all " + fmt(matching) + " in this filter" : selected.size;
  }

  function toggleSelected(i) {
    const card = cards[i];
    allInFilter = false;
    setSelected(card, !selected.has(card.dataset.id));
    anchor = i;
    rangeBase = null;
    showSelected();
  }

  function selectRange(to) {
    if (anchor === null) anchor = pos;
    if (rangeBase === null) rangeBase = new Set(selected);
    allInFilter = false;
    const lo = Math.min(anchor, to), hi = Math.max(anchor, to);
    cards.forEach((c, i) => setSelected(c, rangeBase.has(c.dataset.id) || (i >= lo && i <= hi)));
    showSelected();
  }

  function moveTo(i, extend) {
    const target = Math.max(0, Math.min(cards.length - 1, i));
    if (extend) selectRange(target); else { anchor = null; rangeBase = null; }
    focusAt(i);
  }

  function selectAll() {
    cards.forEach((c) => setSelected(c, true));
    allInFilter = true;
    showSelected();
    toast("Selected all " + fmt(matching) + " images in this filter" + (matching > cards.length ? " (on every page)" : ""));
  }

  function clearSelection() {
    for (const id of [...selected]) setSelected(byId.get(id), false);
    allInFilter = false;
    anchor = null;
    rangeBase = null;
    showSelected();
  }

  function bulk(decision) {
    if (allInFilter) return decideFilter(decision);
    if (!selected.size) { toast("Select images with x first (X: all in this filter)"); return; }
    const ids = [...selected];
    clearSelection();
    decide(ids, decision, false).then(() => {
      if (ids.every((id) => byId.get(id).dataset.review === decision)) toast(decision + ": " + ids.length + " image(s)");
    });
  }

  // --- a confirmation that names the count (Enter confirms, Esc cancels) ---
  let confirming = null;
  function confirmDialog(text, yesLabel) {
    $("confirm-text").textContent = text;
    $("confirm-yes").firstChild.textContent = yesLabel + " ";
    $("confirm").hidden = false;
    $("confirm-yes").focus();
    return new Promise((resolve) => { confirming = resolve; });
  }
  function closeConfirm(answer) {
    $("confirm").hidden = true;
    const resolve = confirming;
    confirming = null;
    if (resolve) resolve(answer);
  }

  // --- captions: c edits the focused card's caption inline; Enter saves, Esc cancels ---
  function editCaption(card) {
    const box = card.querySelector("details.caption-edit");
    const area = box.querySelector("textarea");
    area.value = card.querySelector('[data-role="caption"]').textContent;
    box.open = true;
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  function closeCaption(card) {
    const box = card.querySelector("details.caption-edit");
    box.open = false;
    box.querySelector("textarea").blur();
    card.focus({ preventScroll: true });
  }

  function saveCaption(card) {
    const area = card.querySelector("details.caption-edit textarea");
    const text = area.value;
    closeCaption(card);
    return run(async () => {
      try {
        const res = await post("/caption", { image_id: Number(card.dataset.id), text });
        card.querySelector('[data-role="caption"]').textContent = res.caption;
        card.querySelector('[data-role="caption-source"]').textContent = "human";
        card.dataset.captionSaved = String(res.caption_id);
        toast(res.changed ? "Caption saved" + (res.notes.length ? ": " + res.notes.join("; ") : "") : "Caption unchanged");
        if (!overlay().hidden) showOverlay();
      } catch (err) {
        editCaption(card); // keep what was typed, so nothing is lost
        area.value = text;
        throw err;
      }
    });
  }

  function showOverlay() {
    const card = cards[pos];
    if (!card) return;
    const pics = $("overlay-pictures");
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
    $("overlay-title").textContent = [text(".pick"), text(".meta"), text(".badge[class*=verdict-]"),
      decision ? "you: " + decision : "not decided"].join(" · ");
    const caption = text('[data-role="caption"]');
    $("overlay-caption").textContent = caption ? "“" + caption + "” (" + text('[data-role="caption-source"]') + ")" : "no caption";
    const reason = card.querySelector(".reason");
    $("overlay-reason").textContent = reason ? reason.textContent : "";
    const labels = $("overlay-labels");
    labels.replaceChildren();
    card.querySelectorAll(".labels li").forEach((li) => {
      const out = document.createElement("li");
      out.className = li.className;
      out.textContent = li.textContent;
      labels.append(out);
    });
    overlay().hidden = false;
  }

  function follow(rel) {
    const link = document.querySelector('a[rel="' + rel + '"]');
    if (link) location.href = link.href; else toast(rel === "next" ? "This is the last page" : "This is the first page");
  }

  function onKey(ev) {
    if (confirming) {
      if (ev.key === "Enter" || ev.key === "Escape") { ev.preventDefault(); closeConfirm(ev.key === "Enter"); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target.closest && ev.target.closest("input, select, textarea")) return; // typing is not a command
    const card = cards[pos];
    const shift = ev.shiftKey;
    const keys = {
      a: () => card && decide([card.dataset.id], "accepted", true),
      r: () => card && decide([card.dataset.id], "rejected", true),
      s: () => card && decide([card.dataset.id], "skipped", true),
      A: () => bulk("accepted"), R: () => bulk("rejected"), S: () => bulk("skipped"),
      u: undo,
      x: () => card && toggleSelected(pos),
      X: selectAll,
      c: () => { if (card) { overlay().hidden = true; editCaption(card); } },
      n: () => follow("next"), p: () => follow("prev"),
      j: () => moveTo(pos + 1, false), k: () => moveTo(pos - 1, false),
      ArrowRight: () => moveTo(pos + 1, shift), ArrowLeft: () => moveTo(pos - 1, shift),
      ArrowDown: () => moveTo(pos + columns(), shift), ArrowUp: () => moveTo(pos - columns(), shift),
      Enter: () => (overlay().hidden ? showOverlay() : (overlay().hidden = true)),
      Escape: () => {
        if (!overlay().hidden) overlay().hidden = true;
        else if (card && card.querySelector("details.caption-edit").open) closeCaption(card);
        else clearSelection();
      },
    };
    const action = keys[ev.key];
    if (!action) return;
    ev.preventDefault();
    action();
  }

  document.addEventListener("keydown", onKey);
  overlay().addEventListener("click", () => { overlay().hidden = true; });
  $("confirm-yes").addEventListener("click", () => closeConfirm(true));
  $("confirm-no").addEventListener("click", () => closeConfirm(false));
  document.querySelector(".js-only").hidden = false;
  $("select-all").addEventListener("click", selectAll);
  document.querySelectorAll("[data-filter-action]").forEach((b) =>
    b.addEventListener("click", () => decideFilter(b.dataset.filterAction)));
  cards.forEach((card, i) => {
    card.addEventListener("click", (ev) => {
      if (ev.target.closest("a, button, input, textarea, summary, details")) return;
      if (ev.shiftKey) { ev.preventDefault(); selectRange(i); }
      focusAt(i);
    });
    card.querySelector("button.select").addEventListener("click", (ev) => {
      if (ev.shiftKey) selectRange(i); else toggleSelected(i);
      focusAt(i);
    });
    // The buttons work without this script (a form POST); with it they stay on the page and can be undone.
    card.querySelector("form.actions").addEventListener("submit", (ev) => {
      ev.preventDefault();
      focusAt(i);
      decide([card.dataset.id], ev.submitter.value, true);
    });
    const box = card.querySelector("details.caption-edit");
    const area = box.querySelector("textarea");
    box.addEventListener("toggle", () => { if (box.open) { focusAt(i); area.focus(); } });
    box.querySelector("form").addEventListener("submit", (ev) => { ev.preventDefault(); saveCaption(card); });
    area.addEventListener("keydown", (ev) => {
      // Enter saves (a caption is one line), Esc cancels; neither reaches the grid's shortcuts.
      if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); ev.stopPropagation(); saveCaption(card); }
      else if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); closeCaption(card); }
    });
  });
  // Filters apply as soon as a menu changes.
  document.querySelectorAll(".filters select").forEach((s) => s.addEventListener("change", () => s.form.submit()));
  focusAt(0, false); // the page opens at the top: no scrolling, no forced layout
  showSelected();
  document.body.dataset.ready = "1"; // tests wait for this before pressing keys
})();

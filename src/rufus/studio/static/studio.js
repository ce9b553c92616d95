// Rufus studio: keyboard shortcuts for the item page. No framework, no inline script (the pages'
// Content-Security-Policy allows scripts from /static only).
(function () {
  "use strict";
  function typing(target) {
    var tag = target && target.tagName;
    return tag === "TEXTAREA" || tag === "SELECT" || (tag === "INPUT" && !/^(radio|checkbox|submit|button)$/.test(target.type));
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("label-form");
    var keysDialog = document.getElementById("keys");
    var showKeys = document.getElementById("show-keys");
    if (showKeys && keysDialog) {
      showKeys.addEventListener("click", function (e) { e.preventDefault(); keysDialog.showModal(); });
    }
    var undoForm = document.getElementById("undo-form");
    var skipForm = document.getElementById("skip-form");

    function submitForm(f) {
      if (!f) { return; }
      var button = (f.id && document.querySelector("button[form='" + f.id + "']")) || f.querySelector("button[type=submit]");
      if (button && button.disabled) { return; }
      if (f.requestSubmit) { f.requestSubmit(button || undefined); } else { f.submit(); }
    }

    var task = form ? form.dataset.task : null;
    var cards = Array.prototype.slice.call(document.querySelectorAll(".response"));
    var current = 0;
    function highlight(i) {
      if (!cards.length) { return; }
      current = Math.max(0, Math.min(cards.length - 1, i));
      cards.forEach(function (c, k) { c.classList.toggle("current", k === current && task !== "pairwise"); });
    }
    function markWinner() {
      if (task !== "pairwise") { return; }
      var checked = form.querySelector("input[name=choice]:checked");
      cards.forEach(function (c) { c.classList.toggle("winner", !!checked && checked.value === c.dataset.letter); });
    }
    if (form) {
      highlight(0);
      form.addEventListener("change", markWinner);
      markWinner();
      cards.forEach(function (c, k) { c.addEventListener("click", function () { highlight(k); }); });
    }

    document.addEventListener("keydown", function (e) {
      if (e.altKey || e.metaKey) { return; }
      if (e.key === "Enter" && e.ctrlKey && form) { e.preventDefault(); submitForm(form); return; }
      if (e.ctrlKey || typing(e.target)) { return; }
      var key = e.key;
      if (key === "?") { if (keysDialog) { keysDialog.showModal(); } return; }
      if (key === "u" && undoForm) { e.preventDefault(); submitForm(undoForm); return; }
      if (!form) { if (key === "Enter") { return; } return; }
      if (key === "x" && skipForm) { e.preventDefault(); submitForm(skipForm); return; }
      if (key === "w") {
        e.preventDefault();
        var extras = form.querySelector("details.extras");
        if (extras) { extras.open = true; document.getElementById("better_answer").focus(); }
        return;
      }
      if (key === "Enter") {
        if (e.target && e.target.tagName === "BUTTON") { return; }  // the button submits by itself
        e.preventDefault(); submitForm(form); return;
      }
      if (task === "pairwise") {
        var input = form.querySelector("input[data-key='" + key + "']");
        if (input) { e.preventDefault(); input.checked = true; markWinner(); }
        return;
      }
      if (key === "j" || key === "ArrowDown" || key === "ArrowRight") { e.preventDefault(); highlight(current + 1); return; }
      if (key === "k" || key === "ArrowUp" || key === "ArrowLeft") { e.preventDefault(); highlight(current - 1); return; }
      if (/^[1-9]$/.test(key) && cards.length) {
        var letter = cards[current].dataset.letter;
        if (task === "ranking") {
          var select = form.querySelector("select[name='rank_" + letter + "']");
          if (select && Number(key) <= cards.length) { e.preventDefault(); select.value = key; highlight(current + 1); }
        } else if (task === "rating") {
          var radio = form.querySelector("input[name='rating_" + letter + "'][value='" + key + "']");
          if (radio) { e.preventDefault(); radio.checked = true; highlight(current + 1); }
        }
      }
    });
  });
})();

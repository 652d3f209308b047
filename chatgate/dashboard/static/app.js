// chatgate dashboard: small progressive enhancements; every flow works without this file.
"use strict";

const PLAYGROUND_KEY = "chatgate.playground.key";

function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  return new Promise((resolve, reject) => {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    ok ? resolve() : reject(new Error("copy failed"));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  // A key handed to the playground belongs to the session it was handed over in: a page for
  // a visitor who is not logged in (after logging out, or once the session ended) forgets it,
  // so the next person to log in in this tab does not find it filled in.
  if (!document.querySelector('form[action="/dashboard/logout"]')) {
    sessionStorage.removeItem(PLAYGROUND_KEY);
  }
  // Copy buttons: <button data-copy="#input-id"> (hidden until this script shows them).
  for (const button of document.querySelectorAll("[data-copy]")) {
    const source = document.querySelector(button.dataset.copy);
    if (!source) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      try {
        await copyText(source.value || source.textContent || "");
        button.textContent = "Copied";
        button.classList.add("copied");
      } catch (err) {
        source.select();
        button.textContent = "Press Ctrl+C";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 2500);
    });
  }
  // A chart narrower than its drawing scrolls sideways (phones): show the newest days first.
  for (const chart of document.querySelectorAll(".card.chart")) {
    chart.scrollLeft = chart.scrollWidth;
  }
  // A form that makes or rotates a key runs once: a second click while the first answer is
  // on its way (a slow connection) is refused, and the key the first one made was shown to
  // nobody. Its buttons wait for the answer (disabled after the submit event, so the clicked
  // button's value still goes with the form), and come back when the page does (Back).
  for (const form of document.querySelectorAll("form")) {
    if (!form.querySelector('input[name="once"]')) continue;
    form.addEventListener("submit", () => {
      for (const button of form.querySelectorAll("button")) {
        setTimeout(() => { button.disabled = true; button.dataset.sent = "1"; }, 0);
      }
    });
  }
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return;
    for (const button of document.querySelectorAll("button[data-sent]")) {
      button.disabled = false;
      delete button.dataset.sent;
    }
  });
  // "Back to the form" on a refused form's page: the browser's Back, which keeps what was
  // typed in it (the link itself loads the form anew).
  for (const link of document.querySelectorAll("[data-back]")) {
    link.addEventListener("click", (event) => {
      if (history.length > 1) {
        event.preventDefault();
        history.back();
      }
    });
  }
  // Select the whole key when its box is focused.
  const newKey = document.getElementById("new-key");
  if (newKey) newKey.addEventListener("focus", () => newKey.select());
  // "Try it in the playground": hand the key to the playground in this tab only.
  for (const link of document.querySelectorAll("[data-playground-key]")) {
    link.addEventListener("click", () => {
      const source = document.querySelector(link.dataset.playgroundKey);
      if (source && source.value) sessionStorage.setItem(PLAYGROUND_KEY, source.value);
    });
  }
});

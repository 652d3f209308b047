// The playground: streams /v1/chat/completions in the browser with the user's own key, so
// each message takes the same path (auth, limits, usage) as any application's request.
"use strict";

(() => {
  const KEY_STORE = "chatgate.playground.key";
  const $ = (id) => document.getElementById(id);
  const root = $("playground");
  if (!root) return;
  const base = "/v1";
  const keyInput = $("pg-key");
  const model = $("pg-model");
  const system = $("pg-system");
  const keep = $("pg-conversation");
  const log = $("pg-log");
  const input = $("pg-input");
  const form = $("pg-form");
  const send = $("pg-send");
  const stop = $("pg-stop");
  const status = $("pg-status");
  let history = [];
  let conversation = null;
  let controller = null;

  keyInput.value = sessionStorage.getItem(KEY_STORE) || "";
  keyInput.addEventListener("change", () => {
    const key = keyInput.value.trim();
    key ? sessionStorage.setItem(KEY_STORE, key) : sessionStorage.removeItem(KEY_STORE);
    filterModels();
  });

  for (const radio of document.querySelectorAll("#pg-presets input")) {
    radio.addEventListener("change", () => { system.value = radio.dataset.prompt; reset(); });
  }
  $("pg-clear").addEventListener("click", reset);
  keep.addEventListener("change", reset);

  function reset() {
    history = [];
    conversation = null;
    log.replaceChildren();
    status.textContent = "";
  }

  function bubble(role, text) {
    const empty = $("pg-empty");
    if (empty) empty.remove();
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  function headers() {
    return { "Authorization": "Bearer " + keyInput.value.trim(), "Content-Type": "application/json" };
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error) return body.error.message;
    } catch (err) { /* not JSON */ }
    return "HTTP " + resp.status;
  }

  // Show only the models this key may use (GET /v1/models answers with those).
  async function filterModels() {
    if (!keyInput.value.trim()) return;
    try {
      const resp = await fetch(base + "/models", { headers: headers() });
      if (!resp.ok) { status.textContent = await errorText(resp); return; }
      const allowed = new Set((await resp.json()).data.map((m) => m.id));
      for (const option of model.options) option.disabled = !allowed.has(option.value);
      if (model.selectedOptions[0] && model.selectedOptions[0].disabled) {
        const first = [...model.options].find((o) => !o.disabled);
        if (first) model.value = first.value;
      }
      status.textContent = "";
    } catch (err) { /* offline: leave the list as it is */ }
  }
  filterModels();

  async function ensureConversation() {
    if (!keep.checked || conversation !== null) return;
    try {
      const resp = await fetch(base + "/conversations", {
        method: "POST", headers: headers(), body: JSON.stringify({ metadata: { source: "playground" } }),
      });
      if (resp.ok) { conversation = (await resp.json()).id; return; }
    } catch (err) { /* fall through */ }
    conversation = false;
    status.textContent = "Server-side conversations are unavailable; history is kept in this page.";
  }

  function messagesFor(text) {
    const messages = [];
    const prompt = system.value.trim();
    // The system prompt goes with every turn: the server stores a conversation's turns, not
    // its instructions (as with the Responses API's `instructions`).
    if (prompt) messages.push({ role: "system", content: prompt });
    if (conversation) return messages.concat([{ role: "user", content: text }]);
    return messages.concat(history, [{ role: "user", content: text }]);
  }

  async function submit(text) {
    if (!keyInput.value.trim()) { status.textContent = "Paste one of your API keys first."; keyInput.focus(); return; }
    await ensureConversation();
    bubble("user", text);
    const out = bubble("assistant", "");
    const body = {
      model: model.value, messages: messagesFor(text), stream: true,
      stream_options: { include_usage: true },
    };
    if (conversation) body.conversation = conversation;
    controller = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    status.textContent = "…";
    let answer = "";
    let usage = null;
    try {
      const resp = await fetch(base + "/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const piece = choice.delta && choice.delta.content;
              if (piece) { answer += piece; out.textContent = answer; log.scrollTop = log.scrollHeight; }
            }
          }
        }
      }
      history.push({ role: "user", content: text }, { role: "assistant", content: answer });
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = model.value + (usage ? ` · ${usage.prompt_tokens} in / ${usage.completion_tokens} out tokens` : "");
      out.appendChild(meta);
      status.textContent = "";
    } catch (err) {
      if (err.name === "AbortError") {
        status.textContent = "Stopped.";
        history.push({ role: "user", content: text }, { role: "assistant", content: answer });
      } else {
        if (!answer) out.remove();
        bubble("error", err.message);
        status.textContent = "";
      }
    } finally {
      controller = null;
      send.disabled = false;
      stop.hidden = true;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    submit(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
})();

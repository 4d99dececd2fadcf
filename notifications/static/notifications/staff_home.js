/* The staff home page: refreshes "Sending now", "Scheduled next", "Recent slips" and "Alerts"
   from home/status.json (every 2.5 s while something is sending, every 30 s otherwise).
   No build step and no inline script. Updates in place, keyed by mailing id, so a link that
   has keyboard focus keeps it. The send rate is measured here, from the difference between
   polls over the last minute (the server's figure is the average since the message started). */
(function () {
  "use strict";
  var root = document.getElementById("edsmart-home");
  if (!root) { return; }
  var statusUrl = root.getAttribute("data-status-url");
  var samples = {};  // mailing id -> [[server time ms, sent], ...] over the last minute
  var finishedSeen = {};
  var lastLists = {};
  var WINDOW_MS = 60000;

  function n(x) { return Number(x).toLocaleString("en-AU"); }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function rateOf(m, now) {
    var list = samples[m.id] || [];
    list.push([now, m.sent]);
    while (list.length > 2 && now - list[0][0] > WINDOW_MS) { list.shift(); }
    samples[m.id] = list;
    var first = list[0], last = list[list.length - 1];
    var span = (last[0] - first[0]) / 60000;
    if (span >= 4 / 60) { return { perMinute: (last[1] - first[1]) / span, measured: true }; }
    return { perMinute: m.rate_since_start, measured: false };
  }

  function countsText(m) {
    var parts = [n(m.sent) + " of " + n(m.total) + " sent"];
    if (m.failed) { parts.push(n(m.failed) + " failed"); }
    if (m.unknown) { parts.push(n(m.unknown) + " outcome unknown: ops are looking at it"); }
    if (m.retrying) { parts.push(n(m.retrying) + " waiting to retry"); }
    if (m.skipped) { parts.push(n(m.skipped) + " not sent (address blocked)"); }
    if (m.cancelled) { parts.push(n(m.cancelled) + " cancelled"); }
    if (m.waiting && !m.finished) { parts.push(n(m.waiting) + " still to send"); }
    return parts.join(" · ");
  }

  function etaText(m, now) {
    if (m.finished) { return "Finished."; }
    if (m.paused) { return "Paused: " + m.paused_why + "."; }
    var rate = rateOf(m, now);
    var left = m.waiting + m.retrying;
    if (left === 0) { return "Settling the last replies."; }
    if (!(rate.perMinute > 0)) { return "Starting: waiting for the first emails to go out."; }
    var minutes = left / rate.perMinute;
    var end = new Date(now + minutes * 60000);
    var at;
    try {
      at = end.toLocaleTimeString("en-AU", { hour: "2-digit", minute: "2-digit", hour12: false, timeZone: m.time_zone });
    } catch (e) {
      at = end.toLocaleTimeString();
    }
    var howLong = minutes < 1 ? "less than a minute" : "about " + Math.ceil(minutes) + " min";
    return "About " + n(Math.round(rate.perMinute)) + " a minute" +
      (rate.measured ? " (last minute)" : " (since it started)") +
      " · " + howLong + " left, done around " + at + ".";
  }

  function progressArticle(m) {
    var article = el("article", { "class": "edsmart-progress", "data-mailing": String(m.id) });
    var h = el("h3");
    var a = el("a", { href: m.url }, m.title);
    h.appendChild(a);
    h.appendChild(document.createTextNode(" "));
    h.appendChild(el("span", { "class": "edsmart-kind" }, m.kind + " · " + m.school));
    article.appendChild(h);
    var bar = el("progress", { max: String(Math.max(m.total, 1)), value: "0" });
    bar.setAttribute("aria-label", "Progress of " + m.title);
    article.appendChild(bar);
    article.appendChild(el("p", { "class": "edsmart-counts" }));
    article.appendChild(el("p", { "class": "edsmart-eta" }));
    var more = el("p", { "class": "edsmart-more" });
    more.appendChild(el("a", { href: m.deliveries_url }, "Every recipient of " + m.title));
    article.appendChild(more);
    return article;
  }

  function updateArticle(article, m, now) {
    var bar = article.querySelector("progress");
    bar.max = Math.max(m.total, 1);
    bar.value = m.done;
    bar.setAttribute("aria-valuetext", n(m.done) + " of " + n(m.total) + " done");
    article.querySelector(".edsmart-counts").textContent = countsText(m);
    article.querySelector(".edsmart-eta").textContent = etaText(m, now);
    article.classList.toggle("edsmart-paused", !!m.paused);
    article.classList.toggle("edsmart-finished", !!m.finished);
    if (m.finished && !finishedSeen[m.id]) {
      finishedSeen[m.id] = true;
      var announce = document.getElementById("edsmart-announce");
      if (announce) { announce.textContent = "“" + m.title + "” has finished sending."; }
    }
  }

  function renderSending(list, now) {
    var box = document.getElementById("edsmart-sending");
    var byId = {};
    Array.prototype.forEach.call(box.querySelectorAll("article[data-mailing]"), function (a) {
      byId[a.getAttribute("data-mailing")] = a;
    });
    var empty = box.querySelector(".edsmart-empty");
    if (empty) { empty.hidden = list.length > 0; }
    list.forEach(function (m) {
      var article = byId[String(m.id)];
      if (!article) { article = progressArticle(m); box.appendChild(article); }
      delete byId[String(m.id)];
      updateArticle(article, m, now);
    });
    Object.keys(byId).forEach(function (id) {
      if (!byId[id].contains(document.activeElement)) { byId[id].remove(); }
    });
  }

  function renderList(id, items, row) {
    var key = JSON.stringify(items);
    if (lastLists[id] === key) { return; }
    var list = document.getElementById(id);
    if (list.contains(document.activeElement)) { return; }  // next poll, once focus has left
    lastLists[id] = key;
    var fresh = el("ul", { id: id, "class": list.className });
    items.forEach(function (item) { fresh.appendChild(row(item)); });
    if (!items.length) { fresh.appendChild(el("li", { "class": "edsmart-empty" }, list.getAttribute("data-empty"))); }
    fresh.setAttribute("data-empty", list.getAttribute("data-empty"));
    list.replaceWith(fresh);
  }

  function linkRow(href, text, detail) {
    var li = el("li");
    li.appendChild(el("a", { href: href }, text));
    li.appendChild(document.createTextNode(" " + detail));
    return li;
  }

  function render(data) {
    var now = data.as_of_ms;
    document.getElementById("edsmart-global-paused").hidden = !data.global_paused;
    renderSending(data.sending, now);
    renderList("edsmart-scheduled", data.scheduled, function (u) {
      return linkRow(u.url, u.title, "· " + u.kind + " · " + u.when + " · " + u.school);
    });
    renderList("edsmart-recent", data.recent_slips, function (s) {
      return linkRow(s.url, s.title, "· " + s.answered_percent + "% answered (" + n(s.yes) +
        " yes, " + n(s.no) + " no, " + n(s.none) + " not yet, of " + n(s.total) + ") · " + s.status);
    });
    renderList("edsmart-alerts", data.alerts, function (a) {
      var li = el("li", { "class": "edsmart-alert-" + a.severity });
      li.appendChild(el("strong", {}, a.severity === "critical" ? "Critical: " : "Warning: "));
      li.appendChild(document.createTextNode(a.message + " (" + (a.school ? a.school + ", " : "") + a.raised + ")"));
      return li;
    });
    root.setAttribute("data-updated", String(now));
  }

  var timer = null;
  function poll() {
    fetch(statusUrl, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("status " + r.status); }
        return r.json();
      })
      .then(function (data) {
        render(data);
        document.getElementById("edsmart-stale").hidden = true;
        timer = setTimeout(poll, data.poll_ms);
      })
      .catch(function () {
        document.getElementById("edsmart-stale").hidden = false;
        timer = setTimeout(poll, 10000);
      });
  }

  var initial = document.getElementById("edsmart-home-data");
  if (initial) {
    var data = JSON.parse(initial.textContent);
    render(data);
    timer = setTimeout(poll, data.poll_ms);
  } else {
    poll();
  }
}());

// dicom-node console: refresh the open page's <main> every data-refresh seconds, only when
// something changed (so a button under the pointer is not replaced), and go to the login page
// when the session has ended.
(function () {
  const main = document.querySelector("main[data-refresh]");
  if (!main) return;
  const every = Math.max(1, parseFloat(main.dataset.refresh || "5")) * 1000;
  async function refresh() {
    if (document.hidden) return;
    try {
      const r = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (r.redirected && new URL(r.url).pathname === "/login") { location.assign(r.url); return; }
      if (!r.ok) return;
      const fresh = new DOMParser().parseFromString(await r.text(), "text/html").querySelector("main");
      if (!fresh) return;
      const done = document.getElementById("done");
      if (done) fresh.prepend(done);
      if (fresh.innerHTML !== main.innerHTML) main.innerHTML = fresh.innerHTML;
    } catch (e) { /* the node restarts: try again next time */ }
  }
  setInterval(refresh, every);
})();

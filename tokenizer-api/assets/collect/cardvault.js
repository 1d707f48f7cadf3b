/*! cardvault.js - merchant-side helper for cardvault hosted card collection.
 * Classic script; defines window.CardVault. No dependencies.
 *
 *   var h = CardVault.mount(element, { frameUrl: "https://edge.example/v1/collect/frame/cs_..#secret",
 *                                      title: "Card details", onError: function (code) {} });
 *   h.then(function (msg) { msg.token, msg.brand, msg.last4, msg.exp_month, msg.exp_year, msg.session });
 *   h.unmount();
 *
 * mount() returns a THENABLE handle: {then, catch, promise, iframe, unmount}, so `await mount(...)`
 * works. It resolves once with the cardvault:token message data. It rejects (Error with .code) only
 * for the final codes session_expired, session_completed, session_closed, wrong_secret, or with
 * code "unmounted" if unmount() is called first. Every cardvault:error code goes to onError(code).
 * Messages are accepted only from the frame's own window and the frameUrl's origin. */
(function (w) {
  'use strict';
  var FINAL = { session_expired: 1, session_completed: 1, session_closed: 1, wrong_secret: 1 };

  function fail(code, text) { var e = new Error(text || ('cardvault: ' + code)); e.code = code; return e; }

  function mount(element, opts) {
    opts = opts || {};
    if (!element || element.nodeType !== 1) throw new TypeError('CardVault.mount: element required');
    var url = new URL(opts.frameUrl); // must be absolute
    var local = /^(127\.0\.0\.1|localhost|\[::1\])$/.test(url.hostname);
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && local)) {
      throw new TypeError('CardVault.mount: frameUrl must be https');
    }
    var edgeOrigin = url.origin, settled = false, resolveP, rejectP;
    var onError = typeof opts.onError === 'function' ? opts.onError : null;
    var promise = new Promise(function (res, rej) { resolveP = res; rejectP = rej; });

    var iframe = document.createElement('iframe');
    iframe.title = typeof opts.title === 'string' && opts.title ? opts.title : 'Card details';
    iframe.setAttribute('referrerpolicy', 'no-referrer');
    iframe.style.border = '0';
    iframe.style.width = '100%';
    iframe.style.display = 'block';
    iframe.style.height = '300px';
    iframe.src = url.href;

    function settle(ok, v) {
      if (settled) return;
      settled = true;
      if (ok) resolveP(v); else rejectP(v);
    }

    function onMessage(ev) {
      if (ev.origin !== edgeOrigin || ev.source !== iframe.contentWindow) return;
      var d = ev.data;
      if (!d || typeof d !== 'object' || typeof d.type !== 'string') return;
      if (d.type === 'cardvault:resize') {
        var h = Number(d.height);
        if (isFinite(h)) iframe.style.height = Math.round(Math.min(2000, Math.max(50, h))) + 'px';
      } else if (d.type === 'cardvault:token') {
        if (typeof d.token !== 'string') return;
        settle(true, { type: d.type, session: d.session, token: d.token, brand: d.brand,
          last4: d.last4, exp_month: d.exp_month, exp_year: d.exp_year });
      } else if (d.type === 'cardvault:error') {
        if (settled) return;
        var code = String(d.code);
        if (onError) { try { onError(code); } catch (e) { setTimeout(function () { throw e; }); } }
        if (FINAL[code] === 1) settle(false, fail(code));
      }
    }

    w.addEventListener('message', onMessage);
    element.appendChild(iframe);

    return {
      promise: promise,
      iframe: iframe,
      then: function (a, b) { return promise.then(a, b); },
      'catch': function (b) { return promise.then(null, b); },
      unmount: function () {
        w.removeEventListener('message', onMessage);
        if (iframe.parentNode) iframe.parentNode.removeChild(iframe);
        settle(false, fail('unmounted'));
      }
    };
  }

  w.CardVault = { version: '1.0.0', mount: mount };
})(window);

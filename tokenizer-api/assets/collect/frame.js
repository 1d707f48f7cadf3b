/* cardvault hosted card form. No dependencies. Pure functions are exported for node tests.
 * The card number leaves this frame only in the POST body to submit_url. */
(function () {
  'use strict';
  function digits(s) { return String(s == null ? '' : s).replace(/\D+/g, ''); }

  function luhn(d) {
    if (!/^\d+$/.test(d)) return false;
    for (var s = 0, i = d.length - 1, dbl = 0; i >= 0; i--, dbl ^= 1) {
      var n = (d.charCodeAt(i) - 48) * (dbl + 1);
      s += n > 9 ? n - 9 : n;
    }
    return s % 10 === 0;
  }

  function pre(d, n, lo, hi) { var p = +d.slice(0, n); return d.length >= n && p >= lo && p <= hi; }

  // Prefix rules only, most specific first.
  function detectBrand(d) {
    d = digits(d);
    if (/^3[47]/.test(d)) return 'amex';
    if (/^(36|3[89]|30[0-5])/.test(d)) return 'diners';
    if (pre(d, 4, 3528, 3589)) return 'jcb';
    if (d[0] === '4') return 'visa';
    if (pre(d, 4, 2200, 2204)) return 'mir';
    if (/^5[1-5]/.test(d) || pre(d, 4, 2221, 2720)) return 'mastercard';
    if (/^(6011|64[4-9]|65)/.test(d)) return 'discover';
    if (/^62/.test(d)) return 'unionpay';
    if (/^(50|5[6-8]|6304|6759|676[1-3])/.test(d)) return 'maestro';
    return '';
  }

  // brand: [display name, shortest length, longest, other allowed lengths...]
  var BRANDS = {
    visa: ['Visa', 13, 19, 16], mastercard: ['Mastercard', 16, 16], amex: ['American Express', 15, 15],
    discover: ['Discover', 16, 19], jcb: ['JCB', 16, 19], unionpay: ['UnionPay', 16, 19],
    diners: ['Diners Club', 14, 19], maestro: ['Maestro', 12, 19], mir: ['Mir', 16, 19], '': ['', 12, 19]
  };
  function lengthOk(b, n) { var r = BRANDS[b]; return b === 'visa' ? r.indexOf(n) > 0 : n >= r[1] && n <= r[2]; }
  function cvcLength(b) { return b === 'amex' ? 4 : 3; }

  // Groups of 4; Amex 4-6-5; Diners up to 14 digits 4-6-4.
  function formatNumber(d) {
    d = digits(d);
    var b = detectBrand(d), out = [], i = 0, k = 0;
    d = d.slice(0, BRANDS[b][2]);
    var g = b === 'amex' || (b === 'diners' && d.length <= 14) ? [4, 6, 5] : [];
    while (i < d.length) { var n = g[k++] || 4; out.push(d.slice(i, i + n)); i += n; }
    return out.join(' ');
  }

  function validateNumber(d) {
    var b = detectBrand(d);
    if (!d) return 'Enter your card number.';
    if (d.length < BRANDS[b][1]) return 'Your card number is incomplete.';
    return lengthOk(b, d.length) && luhn(d) ? '' : 'This card number is not valid.';
  }

  // Caret index just after the n-th digit of s.
  function posAfterDigits(s, n) {
    for (var i = 0, c = 0; i < s.length && c < n; i++) if (s[i] >= '0' && s[i] <= '9') c++;
    return i;
  }

  // Display form "MM / YY" (or "MM / YYYY"); a typed "1/" becomes "01 / ".
  function formatExpiry(raw, deleting) {
    raw = String(raw || '');
    var m = /^\s*(\d)\s*[\/\-.]/.exec(raw);
    var d = m ? '0' + m[1] + digits(raw.slice(m[0].length)) : digits(raw);
    if (d[0] > '1') d = '0' + d;
    if (d.length < 2) return d;
    if (d.length === 2) return deleting ? d : d + ' / ';
    return d.slice(0, 2) + ' / ' + d.slice(2, 6);
  }

  // -> {month, year} or {error: 'empty'|'incomplete'|'month'|'past'|'year'}
  function parseExpiry(raw, now) {
    raw = String(raw || '').trim();
    if (!raw) return { error: 'empty' };
    var p = raw.split(/\s*[\/\-.]\s*/), mm = p[0], yy = p[1] || '';
    if (p.length === 1) { mm = raw.slice(0, 2); yy = raw.slice(2); }
    if (p.length > 2 || !/^\d{1,2}$/.test(mm) || !/^(\d\d){1,2}$/.test(yy)) return { error: 'incomplete' };
    var month = +mm, year = yy.length === 2 ? 2000 + +yy : +yy;
    now = now || new Date();
    var cy = now.getFullYear();
    if (month < 1 || month > 12) return { error: 'month' };
    if (year < cy || (year === cy && month <= now.getMonth())) return { error: 'past' };
    if (year > cy + 50) return { error: 'year' };
    return { month: month, year: year };
  }

  var CTRL = /[\u0000-\u001f\u007f]/g;
  function validateName(s) {
    s = String(s || '').trim();
    if (s.length > 64) return 'Use at most 64 characters.';
    if (/[\u0000-\u001f\u007f]/.test(s)) return 'The name contains characters that are not allowed.';
    if (/\d{12,}/.test(s.replace(/[\s.\-\/]+/g, ''))) return 'Enter the name on the card, not a number.';
    return '';
  }

  var FONTS = {
    system: 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
    'sans-serif': 'Arial, "Liberation Sans", sans-serif',
    serif: 'Georgia, "Times New Roman", serif',
    monospace: 'ui-monospace, Menlo, Consolas, monospace'
  };
  var COLORS = { color: 'color', background_color: 'bg', border_color: 'border', error_color: 'error', accent_color: 'accent' };

  function isInt(v, lo, hi) { return typeof v === 'number' && v % 1 === 0 && v >= lo && v <= hi; }
  // Black or white, whichever contrasts more with the #rrggbb background.
  function textOn(hex) {
    var L = [1, 3, 5].reduce(function (a, i, k) {
      var v = parseInt(hex.substr(i, 2), 16) / 255;
      return a + [0.2126, 0.7152, 0.0722][k] * (v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4));
    }, 0);
    return (L + 0.05) * (L + 0.05) > 0.0525 ? '#000000' : '#ffffff';
  }

  // Re-validate the merchant style; anything unexpected is dropped.
  // -> {vars: {'--cv-x': value}, placeholders: {number, expiry, cvc, name}}
  function validateStyle(st) {
    var vars = {}, ph = {};
    if (!st || typeof st !== 'object' || Array.isArray(st)) st = {};
    if (FONTS.hasOwnProperty(st.font_family)) vars['--cv-font'] = FONTS[st.font_family];
    if (isInt(st.font_size_px, 10, 24)) vars['--cv-font-size'] = st.font_size_px + 'px';
    if (isInt(st.border_radius_px, 0, 16)) vars['--cv-radius'] = st.border_radius_px + 'px';
    for (var k in COLORS) {
      if (typeof st[k] === 'string' && /^#[0-9a-f]{6}$/i.test(st[k])) vars['--cv-' + COLORS[k]] = st[k].toLowerCase();
    }
    if (vars['--cv-accent']) vars['--cv-accent-text'] = textOn(vars['--cv-accent']);
    ['number', 'expiry', 'cvc', 'name'].forEach(function (k) {
      var v = st['placeholder_' + k];
      v = typeof v === 'string' ? v.replace(CTRL, '').trim() : '';
      if (v && v.length <= 64) ph[k] = v;
    });
    return { vars: vars, placeholders: ph };
  }

  function isOrigin(o) {
    try { return typeof o === 'string' && new URL(o).origin === o && o !== 'null'; } catch (e) { return false; }
  }

  var logic = {
    digitsOnly: digits, luhn: luhn, detectBrand: detectBrand, cvcLength: cvcLength, formatNumber: formatNumber,
    validateNumber: validateNumber, posAfterDigits: posAfterDigits, formatExpiry: formatExpiry,
    parseExpiry: parseExpiry, validateName: validateName, validateStyle: validateStyle, textOn: textOn, isOrigin: isOrigin
  };
  if (typeof module !== 'undefined' && module.exports) module.exports = logic;
  if (typeof document === 'undefined') return;

  // ---- browser -------------------------------------------------------------
  var AGAIN = ' Reload the page to start again.';
  var SERVER = { // code: [field, message]
    invalid_pan: ['number', 'This card number was not accepted.'],
    invalid_expiry: ['expiry', 'The expiry date was not accepted.'],
    card_expired: ['expiry', 'This card has expired.'],
    invalid_cvc: ['cvc', 'The security code was not accepted.'],
    invalid_cardholder_name: ['name', 'The name was not accepted.'],
    session_expired: ['', 'This form has expired.' + AGAIN],
    session_completed: ['', 'A card has already been saved with this form.'],
    session_closed: ['', 'Too many attempts.' + AGAIN],
    wrong_secret: ['', 'This form could not be verified.' + AGAIN],
    rate_limited: ['', 'Too many attempts right now. Wait a moment and try again.']
  };
  var FINAL = { session_expired: 1, session_completed: 1, session_closed: 1, wrong_secret: 1 };
  var EXP = { empty: 'Enter the expiry date.', incomplete: 'Enter the expiry date as MM / YY.',
    month: 'Enter a month from 01 to 12.', past: 'This card has expired.', year: 'Enter a valid expiry year.' };

  function $(id) { return document.getElementById(id); }

  function start() {
    var live = $('cv-live'), form = $('cv-form'), btn = $('cv-submit'), cfg;
    var F = { number: $('cv-number'), expiry: $('cv-expiry'), cvc: $('cv-cvc'), name: $('cv-name') };
    try { cfg = JSON.parse(document.body.getAttribute('data-config')); } catch (e) { cfg = null; }
    var secret = location.hash.slice(1);
    if (location.hash) history.replaceState(null, '', location.pathname + location.search);

    function post(msg) { if (window.parent !== window) window.parent.postMessage(msg, cfg.allowed_origin); }
    function say(t) { live.textContent = ''; setTimeout(function () { live.textContent = t; }, 50); }
    function note(t) { var m = $('cv-msg'); m.textContent = t; m.hidden = !t; if (t) say(t); }
    function each(fn) { for (var k in F) if (F[k]) fn(k, F[k]); }
    function lock() { each(function (k, el) { el.disabled = true; }); btn.disabled = true; }

    // Report our height to the parent, now and on every change.
    var root = $('cv-root'), lastH = -1;
    function resize() {
      var h = Math.ceil(root.getBoundingClientRect().height);
      if (cfg && h !== lastH) post({ type: 'cardvault:resize', height: lastH = h });
    }
    function sized() { if (window.ResizeObserver) new ResizeObserver(resize).observe(root); resize(); }

    if (cfg && isOrigin(cfg.allowed_origin) && /^session_(expired|completed|closed)$/.test(cfg.final)) {
      // The session is over (the edge answered 410): say why, tell the page.
      form.remove(); note(SERVER[cfg.final][1]); post({ type: 'cardvault:error', code: cfg.final });
      sized(); return;
    }
    if (!cfg || !isOrigin(cfg.allowed_origin) || !/^\/[^\/\\]/.test(cfg.submit_url) || !secret) {
      cfg = null; lock(); note('This form could not be loaded.' + AGAIN); return;
    }
    var st = validateStyle(cfg.style);
    for (var v in st.vars) document.documentElement.style.setProperty(v, st.vars[v]);
    for (var p in st.placeholders) if (F[p]) F[p].placeholder = st.placeholders[p];
    if (!cfg.require_cvc) { $('cv-f-cvc').remove(); F.cvc = null; }

    var errors = {}, busy = false, finished = false, lastNumber = '';
    function setError(k, msg) {
      var el = F[k], m = $('cv-' + k + '-err');
      errors[k] = msg; m.textContent = msg; m.hidden = !msg;
      if (msg) el.setAttribute('aria-invalid', 'true'); else el.removeAttribute('aria-invalid');
    }
    function check(k) {
      var v = F[k].value;
      if (k === 'number') return validateNumber(digits(v));
      if (k === 'expiry') return EXP[parseExpiry(v).error] || '';
      if (k === 'name') return validateName(v);
      var n = cvcLength(detectBrand(F.number.value));
      return v.length === n ? '' : 'Enter the ' + n + '-digit security code.';
    }

    F.number.addEventListener('input', function (ev) {
      var el = F.number, v = el.value, d = digits(v);
      var before = digits(v.slice(0, el.selectionStart == null ? v.length : el.selectionStart)).length;
      // Deleting only a space would be undone by formatting: delete the digit beside it.
      if (d === digits(lastNumber) && v.length < lastNumber.length) {
        if (ev.inputType === 'deleteContentBackward' && before) d = d.slice(0, --before) + d.slice(before + 1);
        else if (ev.inputType === 'deleteContentForward') d = d.slice(0, before) + d.slice(before + 1);
      }
      var f = el.value = lastNumber = formatNumber(d), b = detectBrand(d), pos = posAfterDigits(f, before);
      if (document.activeElement === el) el.setSelectionRange(pos, pos);
      $('cv-brand').textContent = BRANDS[b][0];
      if (F.cvc) F.cvc.maxLength = cvcLength(b);
    });
    F.expiry.addEventListener('input', function (ev) {
      var el = F.expiry, v = el.value, end = el.selectionStart === v.length;
      var f = formatExpiry(v, /^delete/.test(ev.inputType));
      if (f !== v) { el.value = f; if (end && document.activeElement === el) el.setSelectionRange(f.length, f.length); }
    });
    if (F.cvc) F.cvc.addEventListener('input', function () {
      var d = digits(F.cvc.value).slice(0, 4);
      if (d !== F.cvc.value) F.cvc.value = d;
    });
    each(function (k, el) {
      el.addEventListener('input', function () { if (errors[k]) setError(k, check(k)); });
      el.addEventListener('blur', function () {
        if (finished || !el.value) return;
        var m = check(k);
        if (m !== (errors[k] || '')) { setError(k, m); if (m) say(m); }
      });
    });

    function fail(code) {
      var m = SERVER[code] || ['', 'Something went wrong. Please try again.'];
      post({ type: 'cardvault:error', code: code });
      if (F[m[0]]) { setError(m[0], m[1]); F[m[0]].focus(); say(m[1]); } else note(m[1]);
      if (FINAL[code]) { finished = true; lock(); }
    }

    function succeed(d) {
      if (finished) return;
      finished = true;
      post({ type: 'cardvault:token', session: cfg.session, token: d.token, brand: d.brand,
        last4: d.last4, exp_month: d.exp_month, exp_year: d.exp_year });
      F.number.value = ''; if (F.cvc) F.cvc.value = '';
      form.remove(); note('');
      var done = $('cv-done'), name = (BRANDS[d.brand] || [])[0] || 'Card';
      done.textContent = 'Card saved' + (/^\d{4}$/.test(d.last4) ? ': ' + name + ' ending in ' + d.last4 : '.');
      done.hidden = false;
      say(done.textContent);
    }

    form.addEventListener('submit', function (ev) {
      ev.preventDefault();
      if (busy || finished) return;
      var first, msgs = [];
      each(function (k, el) {
        var m = check(k);
        setError(k, m);
        if (m) { msgs.push(m); first = first || el; }
      });
      note('');
      if (first) { first.focus(); say(msgs.join(' ')); return; }

      var exp = parseExpiry(F.expiry.value), name = F.name.value.trim();
      var body = { client_secret: secret, pan: digits(F.number.value), exp_month: exp.month, exp_year: exp.year };
      if (F.cvc) body.cvc = F.cvc.value;
      if (name) body.cardholder_name = name;

      busy = btn.disabled = true; form.setAttribute('aria-busy', 'true'); say('Saving your card…');
      var ctl = new AbortController(), timer = setTimeout(function () { ctl.abort(); }, 30000);
      fetch(cfg.submit_url, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
        credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer', signal: ctl.signal
      }).then(function (res) {
        return res.json().catch(function () { return {}; }).then(function (d) {
          var c = d && d.error && d.error.code;
          if (res.status === 200 && d && typeof d.token === 'string') succeed(d);
          else fail(typeof c === 'string' && /^[a-z_]{1,40}$/.test(c) ? c : 'server_error');
        });
      }, function () {
        post({ type: 'cardvault:error', code: 'network_error' });
        note('Could not reach the server. Check your connection and try again.');
      }).then(function () {
        clearTimeout(timer);
        body = null; busy = false; form.removeAttribute('aria-busy');
        if (!finished) btn.disabled = false;
      });
    });
    sized();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();

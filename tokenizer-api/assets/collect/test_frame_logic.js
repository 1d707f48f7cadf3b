// node test_frame_logic.js  -- unit tests of frame.js pure functions (node's built-in assert only).
'use strict';
const assert = require('assert');
const L = require('./frame.js');
let n = 0;
function t(name, fn) { fn(); n++; }

t('luhn', () => {
  for (const c of ['4111111111111111', '4242424242424242', '5555555555554444', '378282246310005',
    '6011111111111117', '3530111333300000', '36227206271667', '2223003122003222', '6200000000000005',
    '6759649826438453', '2200000000000004']) assert.ok(L.luhn(c), c);
  assert.ok(!L.luhn('4111111111111112'));
  assert.ok(!L.luhn(''));
  assert.ok(!L.luhn('4111 1111'));
});

t('brand', () => {
  const cases = {
    '4111111111111111': 'visa', '4242424242424242': 'visa', '5555555555554444': 'mastercard',
    '2223003122003222': 'mastercard', '2221': 'mastercard', '2720': 'mastercard', '2721': '',
    '378282246310005': 'amex', '34': 'amex', '6011111111111117': 'discover', '644': 'discover',
    '649': 'discover', '65': 'discover', '643': '', '3530111333300000': 'jcb', '3528': 'jcb', '3589': 'jcb',
    '3590': '', '6200000000000005': 'unionpay', '36227206271667': 'diners', '300': 'diners', '305': 'diners',
    '306': '', '38': 'diners', '39': 'diners', '6759649826438453': 'maestro', '50': 'maestro', '56': 'maestro',
    '58': 'maestro', '2200000000000004': 'mir', '2204': 'mir', '2205': '', '': '', '9': '', '4': 'visa'
  };
  for (const [k, v] of Object.entries(cases)) assert.strictEqual(L.detectBrand(k), v, k);
  assert.strictEqual(L.detectBrand('4111 1111'), 'visa');
  assert.strictEqual(L.cvcLength('amex'), 4);
  assert.strictEqual(L.cvcLength('visa'), 3);
  assert.strictEqual(L.cvcLength(''), 3);
});

t('formatNumber', () => {
  const f = L.formatNumber;
  assert.strictEqual(f('4111111111111111'), '4111 1111 1111 1111');
  assert.strictEqual(f('41111'), '4111 1');
  assert.strictEqual(f('4111'), '4111');
  assert.strictEqual(f(''), '');
  assert.strictEqual(f('378282246310005'), '3782 822463 10005');
  assert.strictEqual(f('3782822463100059999'), '3782 822463 10005'); // Amex truncated at 15
  assert.strictEqual(f('36227206271667'), '3622 720627 1667');
  assert.strictEqual(f('5555555555554444999'), '5555 5555 5555 4444'); // Mastercard max 16
  assert.strictEqual(f('4111111111111111111'), '4111 1111 1111 1111 111');
  assert.strictEqual(f('41111111111111111119'), '4111 1111 1111 1111 111'); // max 19
  assert.strictEqual(f('4111-1111 1111.1111'), '4111 1111 1111 1111');
  assert.strictEqual(f('6200000000000005'), '6200 0000 0000 0005');
});

t('validateNumber', () => {
  assert.strictEqual(L.validateNumber('4111111111111111'), '');
  assert.strictEqual(L.validateNumber('378282246310005'), '');
  assert.strictEqual(L.validateNumber('36227206271667'), '');
  assert.notStrictEqual(L.validateNumber('4111111111111112'), '');
  assert.notStrictEqual(L.validateNumber('411111'), '');
  assert.notStrictEqual(L.validateNumber(''), '');
  // No message ever contains the digits.
  assert.ok(!/\d{4}/.test(L.validateNumber('4111111111111112')));
});

t('posAfterDigits', () => {
  assert.strictEqual(L.posAfterDigits('4111 1', 5), 6);
  assert.strictEqual(L.posAfterDigits('4111 1', 4), 4);
  assert.strictEqual(L.posAfterDigits('4111 1', 0), 0);
  assert.strictEqual(L.posAfterDigits('4111 1', 9), 6);
});

t('formatExpiry', () => {
  const f = L.formatExpiry;
  assert.strictEqual(f('1'), '1');
  assert.strictEqual(f('12'), '12 / ');
  assert.strictEqual(f('12', true), '12');
  assert.strictEqual(f('12 /', true), '12');
  assert.strictEqual(f('5'), '05 / ');
  assert.strictEqual(f('1/'), '01 / ');
  assert.strictEqual(f('1/3'), '01 / 3');
  assert.strictEqual(f('1230'), '12 / 30');
  assert.strictEqual(f('12 / 2030'), '12 / 2030');
  assert.strictEqual(f('12/2030'), '12 / 2030');
  assert.strictEqual(f('12 / 203099'), '12 / 2030');
  assert.strictEqual(f(''), '');
});

t('parseExpiry', () => {
  const now = new Date(2025, 5, 15); // June 2025
  const p = (s) => L.parseExpiry(s, now);
  assert.deepStrictEqual(p('12 / 30'), { month: 12, year: 2030 });
  assert.deepStrictEqual(p('12/2030'), { month: 12, year: 2030 });
  assert.deepStrictEqual(p('1/2030'), { month: 1, year: 2030 });
  assert.deepStrictEqual(p('06 / 25'), { month: 6, year: 2025 }); // current month is valid
  assert.deepStrictEqual(p('1230'), { month: 12, year: 2030 });
  assert.deepStrictEqual(p('122030'), { month: 12, year: 2030 });
  assert.deepStrictEqual(p('05 / 25'), { error: 'past' });
  assert.deepStrictEqual(p('12 / 24'), { error: 'past' });
  assert.deepStrictEqual(p('00 / 30'), { error: 'month' });
  assert.deepStrictEqual(p('13 / 30'), { error: 'month' });
  assert.deepStrictEqual(p('12 / 3'), { error: 'incomplete' });
  assert.deepStrictEqual(p('12 / 203'), { error: 'incomplete' });
  assert.deepStrictEqual(p('12 / '), { error: 'incomplete' });
  assert.deepStrictEqual(p(''), { error: 'empty' });
  assert.deepStrictEqual(p('12 / 2099'), { error: 'year' });
  assert.deepStrictEqual(p('ab / cd'), { error: 'incomplete' });
});

t('validateName', () => {
  assert.strictEqual(L.validateName(''), '');
  assert.strictEqual(L.validateName('Jane Q. Doe'), '');
  assert.strictEqual(L.validateName('A'), '');
  assert.strictEqual(L.validateName('José Ñúñez-O\'Brien'), '');
  assert.strictEqual(L.validateName('Jane Doe 3rd'), '');
  assert.notStrictEqual(L.validateName('x'.repeat(65)), '');
  assert.strictEqual(L.validateName('x'.repeat(64)), '');
  assert.notStrictEqual(L.validateName('4111111111111111'), '');
  assert.notStrictEqual(L.validateName('Jane 4111 1111 1111 1111'), '');
  assert.notStrictEqual(L.validateName('Jane\u0007'), '');
});

t('validateStyle', () => {
  const v = L.validateStyle({
    font_family: 'serif', font_size_px: 18, color: '#112233', background_color: '#FFFFFF',
    border_color: '#abcdef', error_color: '#ff0000', accent_color: '#ffd54f', border_radius_px: 0,
    placeholder_number: 'Number', placeholder_name: '<b>x</b>', placeholder_cvc: '\u0000 ', extra: 'x'
  });
  assert.match(v.vars['--cv-font'], /serif$/);
  assert.strictEqual(v.vars['--cv-font-size'], '18px');
  assert.strictEqual(v.vars['--cv-radius'], '0px');
  assert.strictEqual(v.vars['--cv-color'], '#112233');
  assert.strictEqual(v.vars['--cv-bg'], '#ffffff');
  assert.strictEqual(v.vars['--cv-accent-text'], '#000000'); // dark text on yellow
  assert.deepStrictEqual(v.placeholders, { number: 'Number', name: '<b>x</b>' }); // set as attribute, never HTML
  assert.strictEqual(Object.keys(v.vars).length, 9);
  const bad = L.validateStyle({
    font_family: 'Comic Sans', font_size_px: 9, border_radius_px: 17, color: 'red', background_color: '#fff',
    border_color: '#1234567', error_color: 'url(https://x)', accent_color: '#12345g', placeholder_number: 'x'.repeat(65)
  });
  assert.deepStrictEqual(bad, { vars: {}, placeholders: {} });
  assert.deepStrictEqual(L.validateStyle({ font_size_px: 12.5 }).vars, {});
  assert.deepStrictEqual(L.validateStyle({ font_size_px: '12' }).vars, {});
  assert.deepStrictEqual(L.validateStyle({ font_family: 'toString' }).vars, {});
  assert.deepStrictEqual(L.validateStyle({ font_family: '__proto__' }).vars, {});
  assert.deepStrictEqual(L.validateStyle(null), { vars: {}, placeholders: {} });
  assert.deepStrictEqual(L.validateStyle([1]), { vars: {}, placeholders: {} });
  assert.strictEqual(L.validateStyle({ accent_color: '#0b57d0' }).vars['--cv-accent-text'], '#ffffff');
});

t('isOrigin', () => {
  assert.ok(L.isOrigin('https://shop.example'));
  assert.ok(L.isOrigin('http://127.0.0.1:8702'));
  assert.ok(!L.isOrigin('*'));
  assert.ok(!L.isOrigin('null'));
  assert.ok(!L.isOrigin('https://shop.example/'));
  assert.ok(!L.isOrigin(undefined));
});

console.log(`ok: ${n} test groups passed`);
t('hardening', () => {
  assert.deepStrictEqual(L.validateStyle({ color: ['#aabbcc'] }).vars, {});
  assert.strictEqual(L.validateName('Jane'), '');
  assert.strictEqual(L.validateName('Jane'), ''); // no stateful /g regex
  assert.strictEqual(L.formatExpiry('12'), '12 / ');
  assert.strictEqual(L.formatExpiry('0'), '0');
});
console.log('ok: hardening');

// Helpers every page uses: the API client (bearer token from sessionStorage, no cookies, so no CSRF),
// a DOM builder that only ever sets text (never innerHTML, so data from the API cannot inject markup),
// formatting, sortable tables, forms that show the API's validation errors, and confirmations.

const TOKEN_KEY = 'replicator.token';
const ROLE_KEY = 'replicator.role';
const NAME_KEY = 'replicator.name';
const RANK = { 'read-only': 0, operator: 1, admin: 2 };

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  get role() { return sessionStorage.getItem(ROLE_KEY) || 'read-only'; },
  get name() { return sessionStorage.getItem(NAME_KEY) || ''; },
  save(token, name, role) {
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(NAME_KEY, name);
    sessionStorage.setItem(ROLE_KEY, role);
  },
  clear() { sessionStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(ROLE_KEY); sessionStorage.removeItem(NAME_KEY); },
  /** True when the signed-in role may do what `needed` may ('operator' or 'admin'). */
  can(needed) { return RANK[this.role] >= RANK[needed]; },
};

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Calls the controller's REST API; resolves to the parsed JSON, rejects with ApiError carrying its one-line error. */
export async function api(path, { method = 'GET', body, token } = {}) {
  const headers = { Accept: 'application/json' };
  const bearer = token || session.token;
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                               credentials: 'omit', cache: 'no-store' });
  } catch (e) {
    throw new ApiError(0, `controller unreachable: ${e.message}`);
  }
  const text = await resp.text();
  let data = null;
  if (text) { try { data = JSON.parse(text); } catch { data = null; } }
  if (!resp.ok) {
    const msg = (data && (data.error || (typeof data.detail === 'string' && data.detail))) || `HTTP ${resp.status}`;
    if (resp.status === 401 && !token) window.dispatchEvent(new CustomEvent('portal:unauthorized'));
    throw new ApiError(resp.status, msg);
  }
  return data;
}

/** Builds an element: h('a', {href, class, onclick}, 'text', child, [more]). Strings become text nodes. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }

// ------------------------------------------------------------------------------------------- formatting
export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0; let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtDuration(s) {
  if (s === null || s === undefined) return '—';
  s = Number(s);
  if (s > 0 && s < 10) return `${s.toFixed(1)} s`;
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60 ? `${s % 60} s` : ''}`.trim();
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function ago(iso) {
  if (!iso) return '—';
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  return s < 0 ? fmtTime(iso) : `${fmtDuration(s)} ago`;
}

const HEALTH_CLASS = { Normal: 'ok', Warning: 'warn', Critical: 'bad' };
export function healthBadge(health) {
  return h('span', { class: `badge ${HEALTH_CLASS[health] || 'unknown'}` }, health || 'Unknown');
}

export function stateBadge(state) {
  const cls = { succeeded: 'ok', running: 'info', queued: 'unknown', failed: 'bad', cancelled: 'unknown',
                waiting_for_input: 'warn' }[state] || 'unknown';
  return h('span', { class: `badge ${cls}` }, state || '—');
}

export function progressBar(pct) {
  const p = Math.max(0, Math.min(100, Number(pct) || 0));
  const bar = h('div', { class: 'bar' });
  bar.style.width = `${p}%`;     // through the CSSOM: the page's CSP allows no inline style attributes
  return h('div', { class: 'progress', role: 'progressbar', 'aria-valuenow': p, 'aria-valuemin': 0, 'aria-valuemax': 100 },
    bar, h('span', { class: 'pct' }, `${p}%`));
}

// ------------------------------------------------------------------------------------------- feedback
export function notify(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const t = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  box.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 10000 : 4000);
}

/** A modal asking to confirm `message` (with `extra` controls, e.g. a checkbox); resolves true only when the
 * user presses the confirm button. */
export function confirmDialog(title, message, confirmLabel = 'Confirm', extra = null) {
  return new Promise((resolve) => {
    const dlg = h('dialog', { class: 'confirm', 'aria-label': title });
    const done = (ok) => { dlg.close(); dlg.remove(); resolve(ok); };
    dlg.append(h('h3', {}, title), h('p', {}, message), extra,
      h('div', { class: 'buttons' },
        h('button', { type: 'button', class: 'secondary', onclick: () => done(false) }, 'Cancel'),
        h('button', { type: 'button', class: 'danger', 'data-confirm': '1', onclick: () => done(true) }, confirmLabel)));
    dlg.addEventListener('cancel', () => done(false));
    document.body.append(dlg);
    dlg.showModal();
  });
}

/**
 * Runs an API action after confirmation, reporting its outcome; resolves to the response or null. With
 * options.force, the dialog offers a "force" checkbox whose state goes in the body as `force`.
 */
export async function confirmAndCall(title, message, path, options = {}) {
  const force = options.force ? h('input', { type: 'checkbox', name: 'force' }) : null;
  const extra = force && h('label', { class: 'force' }, force, ` ${options.force}`);
  if (!(await confirmDialog(title, message, options.label || 'Confirm', extra))) return null;
  const body = force ? { ...options.body, force: force.checked } : options.body;
  try {
    const out = await api(path, { method: options.method || 'POST', body });
    notify(`${title}: done`, 'ok');
    return out ?? {};
  } catch (e) {
    notify(`${title}: ${e.message}`, 'error');
    return null;
  }
}

// ------------------------------------------------------------------------------------------- tables
/**
 * A table with clickable headers to sort and, when `filter` is set, a text box filtering rows on every
 * column's text. columns: [{key, label, value(row) -> sortable value, render(row) -> node|string}].
 */
export function dataTable(columns, rows, { filter = false, empty = 'Nothing here yet.', id, sortKey } = {}) {
  let key = sortKey || null; let dir = 1; let query = '';
  const tbody = h('tbody');
  const heads = columns.map((c) => h('th', { scope: 'col', 'data-key': c.key, tabindex: 0,
    onclick: () => { dir = key === c.key ? -dir : 1; key = c.key; draw(); } }, c.label));
  const table = h('table', { class: 'data', id }, h('thead', {}, h('tr', {}, heads)), tbody);
  const val = (c, r) => (c.value ? c.value(r) : r[c.key]);
  function draw() {
    let shown = rows;
    if (query) {
      const q = query.toLowerCase();
      shown = rows.filter((r) => columns.some((c) => String(val(c, r) ?? '').toLowerCase().includes(q)));
    }
    if (key) {
      const c = columns.find((x) => x.key === key);
      shown = [...shown].sort((a, b) => {
        const x = val(c, a); const y = val(c, b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * dir;
      });
    }
    heads.forEach((th) => th.setAttribute('aria-sort', th.dataset.key === key ? (dir > 0 ? 'ascending' : 'descending') : 'none'));
    clear(tbody, shown.length ? shown.map((r) => h('tr', {}, columns.map((c) => h('td', { 'data-col': c.key },
      c.render ? c.render(r) : (val(c, r) ?? '—'))))) : h('tr', {}, h('td', { colspan: columns.length, class: 'empty' }, empty)));
  }
  draw();
  const box = h('div', { class: 'table-box' });
  if (filter) {
    box.append(h('input', { type: 'search', class: 'filter', placeholder: 'Filter…', 'aria-label': 'Filter',
      oninput: (e) => { query = e.target.value.trim(); draw(); } }));
  }
  box.append(table);
  box.update = (newRows) => { rows = newRows; draw(); };
  return box;
}

// ------------------------------------------------------------------------------------------- forms
/**
 * A form whose submit sends the fields to the API; the API's validation error is shown under the form,
 * as the API worded it. fields: [{name, label, type: text|number|checkbox|select|textarea|list, options,
 * value, hint}]; a list is typed comma-separated and sent as an array.
 */
export function apiForm({ title, fields, submitLabel = 'Save', onSubmit, id }) {
  const error = h('p', { class: 'form-error', role: 'alert', hidden: true });
  const inputs = {};
  const rows = fields.map((f) => {
    let input;
    if (f.type === 'select') {
      input = h('select', { name: f.name }, (f.options || []).map((o) => {
        const [v, l] = Array.isArray(o) ? o : [o, o];
        return h('option', { value: v, selected: v === f.value }, l);
      }));
    } else if (f.type === 'textarea') {
      input = h('textarea', { name: f.name, rows: f.rows || 4, placeholder: f.placeholder });
      input.value = f.value ?? '';
    } else if (f.type === 'checkbox') {
      input = h('input', { type: 'checkbox', name: f.name, checked: !!f.value });
    } else {
      input = h('input', { type: f.type === 'list' ? 'text' : (f.type || 'text'), name: f.name, value: f.value ?? '',
                           placeholder: f.placeholder });
    }
    inputs[f.name] = { input, field: f };
    return h('label', { class: 'field' }, h('span', {}, f.label), input, f.hint ? h('small', {}, f.hint) : null);
  });
  const form = h('form', { class: 'api-form', id, novalidate: true }, title ? h('h3', {}, title) : null, rows,
    h('button', { type: 'submit' }, submitLabel), error);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const values = {};
    for (const [name, { input, field }] of Object.entries(inputs)) {
      if (field.type === 'checkbox') values[name] = input.checked;
      else if (input.value === '' && !field.keepEmpty) continue;
      else if (field.type === 'number') values[name] = Number(input.value);
      else if (field.type === 'list') values[name] = input.value.split(',').map((s) => s.trim()).filter(Boolean);
      else values[name] = input.value;
    }
    error.hidden = true;
    try {
      await onSubmit(values);
      form.reset();
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
    }
  });
  return form;
}

export function section(title, ...children) {
  return h('section', { class: 'card' }, h('h2', {}, title), children);
}

// The console's shell: sign-in with an API token, the navigation, and a hash router that loads one module
// per page (pages/*.js export `render(main, params)`, which may return a function to call when leaving).

import { api, clear, h, session, notify } from './lib.js';
import { stopStream, subscribe } from './events.js';

// The navigation, in order (docs/portal.md says what each page shows and does).
const PAGES = [
  { path: 'overview', title: 'Overview', load: () => import('./pages/overview.js') },
  { path: 'items', title: 'Replicated items', load: () => import('./pages/items.js') },
  { path: 'jobs', title: 'Jobs', load: () => import('./pages/jobs.js') },
  { path: 'plans', title: 'Recovery plans', load: () => import('./pages/plans.js') },
  { path: 'infrastructure', title: 'Infrastructure', load: () => import('./pages/infrastructure.js') },
  { path: 'settings', title: 'Settings', load: () => import('./pages/settings.js') },
];
// Pages reached from others, not from the navigation.
const HIDDEN = [
  { path: 'machines', title: 'Machine', load: () => import('./pages/machine.js') },
];

const main = document.getElementById('main');
let leave = null;

function renderNav(current) {
  const nav = document.getElementById('nav');
  clear(nav, session.token && PAGES.map((p) => h('a', { href: `#/${p.path}`, class: p.path === current ? 'active' : null,
    'aria-current': p.path === current ? 'page' : null }, p.title)));
  document.getElementById('who').textContent = session.token ? `${session.name} (${session.role})` : '';
  document.getElementById('logout').hidden = !session.token;
  document.body.dataset.role = session.token ? session.role : '';
}

function loginPage(message) {
  renderNav(null);
  const error = h('p', { class: 'form-error', role: 'alert', hidden: !message }, message || '');
  const input = h('input', { type: 'password', name: 'token', id: 'token', autocomplete: 'off', required: true });
  const form = h('form', { class: 'login card', id: 'login' },
    h('h2', {}, 'Sign in'),
    h('p', {}, 'Paste an API token (replicator-controller token create, or the admin token in the controller\'s data folder).'),
    h('label', { class: 'field' }, h('span', {}, 'API token'), input),
    h('button', { type: 'submit' }, 'Sign in'), error);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    try {
      const me = await api('/v1/whoami', { token });
      session.save(token, me.name, me.role);
      if (!location.hash.replace(/^#\/?/, '')) history.replaceState(null, '', '#/overview');
      route();                                 // the page asked for before signing in, else the Overview
    } catch (e) {
      error.textContent = e.status === 401 ? 'This token is not valid (unknown, revoked or mistyped).' : e.message;
      error.hidden = false;
    }
  });
  clear(main, form);
  input.focus();
}

let generation = 0;

async function route() {
  const mine = ++generation;                 // a newer navigation supersedes this one while it loads
  if (leave) { try { leave(); } catch (e) { console.error(e); } leave = null; }
  if (!session.token) { loginPage(); return; }
  const [path, ...params] = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  const page = [...PAGES, ...HIDDEN].find((p) => p.path === path);
  if (!page) { location.hash = '#/overview'; return; }
  renderNav(path === 'machines' ? 'items' : path);
  document.title = `${page.title} · replicator`;
  clear(main, h('p', { class: 'loading' }, 'Loading…'));
  try {
    const mod = await page.load();
    if (mine !== generation) return;
    const view = h('div', { class: 'page', id: `page-${path}` });
    clear(main, view);
    const done = (await mod.render(view, params)) || null;
    if (mine !== generation) { if (done) done(); return; }
    leave = done;
  } catch (e) {
    clear(main, h('p', { class: 'form-error', role: 'alert' }, e.message));
  }
}

function logout(message) {
  stopStream();
  readyBefore = false;
  session.clear();
  history.replaceState(null, '', '#/');      // no hashchange: the message below stays
  loginPage(message);
}

// After the first `ready` of a session, a `ready` means the stream reconnected: what happened meanwhile was
// never sent, so the page is drawn again from the API.
let readyBefore = false;
subscribe('ready', () => { if (readyBefore && session.token) route(); readyBefore = true; });

document.getElementById('logout').addEventListener('click', () => logout());
window.addEventListener('portal:unauthorized', () => { if (session.token) { notify('Signed out: the token is no longer valid.', 'error'); logout('The token is no longer valid.'); } });
window.addEventListener('hashchange', route);
route();

// The Settings page's access part: API tokens (admin: create, shown once; revoke) and the audit log (all).

import { api, apiForm, clear, confirmAndCall, dataTable, fmtTime, h, section, session } from '../lib.js';

const AUDIT_LIMIT = 200;

export async function accessSections(redraw) {
  const admin = session.can('admin');
  const [tokens, audit] = await Promise.all([admin ? api('/v1/tokens') : Promise.resolve(null),
    api(`/v1/audit?limit=${AUDIT_LIMIT}`)]);
  const secretBox = h('div', { id: 'new-token' });
  const out = [];
  if (admin) {
    out.push(section('API tokens',
      dataTable([
        { key: 'name', label: 'Token' }, { key: 'role', label: 'Role' }, { key: 'created_by', label: 'Made by' },
        { key: 'created_at', label: 'Made', render: (t) => fmtTime(t.created_at) },
        { key: 'last_used_at', label: 'Last used', render: (t) => fmtTime(t.last_used_at) },
        { key: 'revoked_at', label: 'Revoked', render: (t) => (t.revoked_at ? fmtTime(t.revoked_at) : 'no') },
        { key: 'x', label: '', value: () => null, render: (t) => !t.revoked_at && t.name !== session.name
          && h('button', { type: 'button', class: 'secondary', 'data-action': 'revoke', onclick: async () => {
            if (await confirmAndCall(`Revoke token ${t.name}`, `Requests with token ${t.name} will be refused from now on.`,
              `/v1/tokens/${encodeURIComponent(t.name)}`, { method: 'DELETE', label: 'Revoke' })) await redraw();
          } }, 'Revoke') },
      ], tokens, { id: 'tokens' }),
      apiForm({ id: 'token-form', title: 'New token', submitLabel: 'Create token', fields: [
        { name: 'name', label: 'Name' },
        { name: 'role', label: 'Role', type: 'select', options: ['read-only', 'operator', 'admin'] }],
        onSubmit: async (v) => {
          const t = await api('/v1/tokens', { method: 'POST', body: v });
          await redraw();
          clear(document.getElementById('new-token'), h('p', {}, `Token ${t.name} (${t.role}); copy it now, it is not shown again:`),
            h('pre', { class: 'log', id: 'new-token-secret' }, t.token));
        } }),
      secretBox));
  }
  out.push(section(`Audit log (latest ${AUDIT_LIMIT})`, dataTable([
    { key: 'at', label: 'When', render: (a) => fmtTime(a.at) }, { key: 'actor', label: 'Who' },
    { key: 'action', label: 'What' }, { key: 'target', label: 'On' }, { key: 'outcome', label: 'Outcome' },
  ], audit, { id: 'audit', filter: true, empty: 'Nothing recorded yet.' })));
  return out;
}

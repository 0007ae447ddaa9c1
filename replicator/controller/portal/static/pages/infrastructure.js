// Infrastructure: sites, hosts (green when they reported in the last 5 minutes, red otherwise), the
// replication links between hosts, certificates and their expiry, and registration keys for new hosts.

import { api, ago, apiForm, clear, confirmAndCall, dataTable, fmtTime, h, healthBadge, notify, section, session } from '../lib.js';
import { CERT_WARN_DAYS, certDaysLeft, hostUp } from './common.js';

const WORST = { Critical: 3, Warning: 2, Normal: 1 };

/** Primary host -> replica host, with how many machines replicate along it and the worst health among them. */
export function links(machines) {
  const by = new Map();
  for (const x of machines) {
    if (!x.primary_host || !x.replica_host || x.desired_state === 'disabled') continue;
    const key = `${x.primary_host}\u0000${x.replica_host}`;
    if (!by.has(key)) by.set(key, { from: x.primary_host, to: x.replica_host, machines: [], health: null });
    const l = by.get(key);
    l.machines.push(x.name);
    if ((WORST[x.health] || 0) > (WORST[l.health] || 0)) l.health = x.health;
  }
  return [...by.values()];
}

export async function render(view) {
  const keyBox = h('div', { id: 'registration-key' });

  async function draw() {
    const [sites, hosts, machines, clouds] = await Promise.all([api('/v1/sites'), api('/v1/hosts'), api('/v1/machines'),
      api('/v1/clouds')]);
    const admin = session.can('admin');
    const now = Date.now();
    const hostCount = (site) => hosts.filter((x) => x.site === site).length;

    async function makeKey(site) {
      try {
        const key = await api(`/v1/sites/${encodeURIComponent(site)}/registration-keys`, { method: 'POST', body: {} });
        const text = `${JSON.stringify(key, null, 2)}\n`;
        const href = URL.createObjectURL(new Blob([text], { type: 'application/json' }));
        clear(keyBox, h('h3', {}, `Registration key for site ${site}`),
          h('p', {}, `Single use, valid until ${fmtTime(key.expires)}. Save it on the new host and run `,
            h('code', {}, `replicatord --register ${key.controller} --key ${site}.key`), '. It is shown only now.'),
          h('pre', { class: 'log', id: 'registration-key-text' }, text),
          h('a', { href, download: `${site}.key`, id: 'registration-key-download' }, 'Download the key file'));
      } catch (e) { notify(`Registration key: ${e.message}`, 'error'); }
    }

    const siteTable = dataTable([
      { key: 'name', label: 'Site' }, { key: 'description', label: 'Description' },
      { key: 'hosts', label: 'Hosts', value: (x) => hostCount(x.name) },
      { key: 'x', label: '', value: () => null, render: (x) => admin && h('button', { type: 'button', class: 'secondary',
        'data-action': 'registration-key', onclick: () => makeKey(x.name) }, 'New registration key') },
    ], sites, { id: 'sites', empty: 'No sites yet.' });

    const hostTable = dataTable([
      { key: 'up', label: '', value: (x) => (hostUp(x, now) ? 1 : 0),
        render: (x) => h('span', { class: `badge ${hostUp(x, now) ? 'ok' : 'bad'}`, 'data-up': hostUp(x, now) ? '1' : '0' }, hostUp(x, now) ? 'up' : 'down') },
      { key: 'hostname', label: 'Host' }, { key: 'site', label: 'Site' }, { key: 'cloud', label: 'Cloud' },
      { key: 'last_seen', label: 'Last report', render: (x) => ago(x.last_seen) },
      { key: 'revision', label: 'Configuration', value: (x) => x.applied_revision - x.desired_revision,
        render: (x) => (x.applied_revision < x.desired_revision ? h('span', { class: 'breach' }, `revision ${x.applied_revision} of ${x.desired_revision}`) : `revision ${x.applied_revision} (current)`) },
      { key: 'cert', label: 'Certificate expires', value: (x) => x.cert_not_after, render: (x) => {
        const d = certDaysLeft(x, now);
        if (d === null) return '—';
        return h('span', { class: d < CERT_WARN_DAYS ? 'breach' : null }, `${fmtTime(x.cert_not_after)} (${d < 0 ? 'expired' : `${Math.floor(d)} days`})`);
      } },
      { key: 'data_url', label: 'Data URL' }, { key: 'admin_url', label: 'Admin URL' },
      { key: 'x', label: '', value: () => null, render: (x) => admin && h('button', { type: 'button', class: 'secondary',
        'data-action': 'forget', onclick: async () => {
          if (await confirmAndCall(`Forget host ${x.hostname}`, `Its certificate is refused from now on; it joins again only with a new registration key.`,
            `/v1/hosts/${encodeURIComponent(x.id)}`, { method: 'DELETE', label: 'Forget host' })) await draw();
        } }, 'Forget') },
    ], hosts, { id: 'hosts', filter: true, empty: 'No hosts have registered yet.' });

    const linkTable = dataTable([
      { key: 'from', label: 'Primary host' }, { key: 'to', label: 'Replica host' },
      { key: 'n', label: 'Machines', value: (l) => l.machines.length, render: (l) => `${l.machines.length}: ${l.machines.join(', ')}` },
      { key: 'health', label: 'Worst health', render: (l) => healthBadge(l.health) },
    ], links(machines), { id: 'links', empty: 'No machine replicates between hosts yet.' });

    clear(view, h('h1', {}, 'Infrastructure'),
      section('Sites', siteTable, admin && apiForm({ id: 'site-form', title: 'New site', submitLabel: 'Create site',
        fields: [{ name: 'name', label: 'Name' }, { name: 'description', label: 'Description' }],
        onSubmit: async (v) => { await api('/v1/sites', { method: 'POST', body: v }); notify(`Site ${v.name} created`, 'ok'); await draw(); } }),
        keyBox),
      section('Hosts', hostTable, admin && hosts.length > 0 && apiForm({ id: 'host-cloud-form', title: 'Put a host in a cloud',
        submitLabel: 'Move host', fields: [
          { name: 'host', label: 'Host', type: 'select', options: hosts.map((x) => x.hostname) },
          { name: 'cloud', label: 'Cloud (of its site)', type: 'select', options: [['', '(none)'], ...clouds.map((c) => [c.name, `${c.name} (${c.site})`])] }],
        onSubmit: async ({ host, cloud }) => {
          await api(`/v1/hosts/${encodeURIComponent(host)}/cloud`, { method: 'PUT', body: { cloud: cloud ?? null } });
          notify(`Host ${host} ${cloud ? `is in cloud ${cloud}` : 'is in no cloud'}`, 'ok');
          await draw();
        } })),
      section('Replication links', linkTable));
  }
  await draw();
}

// Settings: clouds, cloud pairs and their extended legs, protection policies, network and storage mappings, API tokens and the
// audit log. Admins get the forms;
// every form posts to the REST API and shows its validation error as the API words it (the console checks
// nothing on its own, so it can never disagree with the API).

import { accessSections } from './access.js';
import { api, apiForm, clear, confirmAndCall, dataTable, fmtBytes, fmtDuration, h, section, session, notify } from '../lib.js';

const yesNo = (v) => (v ? 'yes' : 'no');

export async function render(view) {
  async function draw() {
    const [sites, clouds, pairs, policies] = await Promise.all([
      api('/v1/sites'), api('/v1/clouds'), api('/v1/pairs'), api('/v1/policies')]);
    const admin = session.can('admin');
    const done = async (what) => { notify(what, 'ok'); await draw(); };
    const del = (what, path) => admin && h('button', { type: 'button', class: 'secondary', 'data-action': 'delete',
      onclick: async () => { if (await confirmAndCall(`Delete ${what}`, `Delete ${what}?`, path, { method: 'DELETE', label: 'Delete' })) await draw(); } }, 'Delete');
    const names = (xs) => xs.map((x) => x.name);

    const cloudSection = section('Clouds',
      dataTable([
        { key: 'name', label: 'Cloud' }, { key: 'site', label: 'Site' },
        { key: 'pair', label: 'Pair', value: (c) => (c.pair ? `${c.pair} (${c.pair_role})` : null) },
        { key: 'hosts', label: 'Hosts', value: (c) => c.hosts.join(', ') || null },
        { key: 'description', label: 'Description' },
        { key: 'x', label: '', value: () => null, render: (c) => del(`cloud ${c.name}`, `/v1/clouds/${encodeURIComponent(c.name)}`) },
      ], clouds, { id: 'clouds', empty: 'No clouds yet.' }),
      admin && apiForm({ id: 'cloud-form', title: 'New cloud', submitLabel: 'Create cloud', fields: [
        { name: 'name', label: 'Name' },
        { name: 'site', label: 'Site', type: 'select', options: names(sites) },
        { name: 'description', label: 'Description' }],
        onSubmit: async (v) => { await api('/v1/clouds', { method: 'POST', body: v }); await done(`Cloud ${v.name} created`); } }));

    const pairSection = section('Cloud pairs',
      dataTable([
        { key: 'name', label: 'Pair' }, { key: 'primary', label: 'Primary cloud' }, { key: 'recovery', label: 'Recovery cloud' },
        { key: 'policy', label: 'Policy' }, { key: 'extended', label: 'Extended to' },
        { key: 'x', label: '', value: () => null, render: (p) => del(`pair ${p.name}`, `/v1/pairs/${encodeURIComponent(p.name)}`) },
      ], pairs, { id: 'pairs', empty: 'No cloud pairs yet.' }),
      admin && apiForm({ id: 'pair-form', title: 'New pair', submitLabel: 'Pair clouds', fields: [
        { name: 'name', label: 'Name' },
        { name: 'primary', label: 'Primary cloud', type: 'select', options: names(clouds) },
        { name: 'recovery', label: 'Recovery cloud', type: 'select', options: names(clouds) },
        { name: 'policy', label: 'Policy', type: 'select', options: [['', '(none yet)'], ...names(policies)] }],
        onSubmit: async (v) => { await api('/v1/pairs', { method: 'POST', body: v }); await done(`Pair ${v.name} created`); } }),
      admin && pairs.length > 0 && apiForm({ id: 'pair-policy-form', title: 'Policy of a pair', submitLabel: 'Set policy', fields: [
        { name: 'pair', label: 'Pair', type: 'select', options: names(pairs) },
        { name: 'policy', label: 'Policy', type: 'select', options: names(policies) }],
        onSubmit: async ({ pair, policy }) => {
          await api(`/v1/pairs/${encodeURIComponent(pair)}/policy`, { method: 'PUT', body: { policy: policy ?? null } });
          await done(`Pair ${pair} follows ${policy}`);
        } }));

    // each pair's extended leg (Hyper-V's extended replication): its own policy and where each machine's
    // extended replica is placed
    const legs = await Promise.all(pairs.filter((p) => p.extended)
      .map((p) => api(`/v1/pairs/${encodeURIComponent(p.name)}/extended`).catch(() => null)));
    const extendedSection = section('Extended replication',
      dataTable([
        { key: 'pair', label: 'Pair' }, { key: 'cloud', label: 'Third cloud' },
        { key: 'frequency', label: 'Frequency', render: (x) => fmtDuration(x.frequency) },
        { key: 'additional_points', label: 'Extra points' },
        { key: 'compression', label: 'Compression', render: (x) => yesNo(x.compression) },
        { key: 'bandwidth_limit', label: 'Bandwidth', render: (x) => (x.bandwidth_limit ? `${fmtBytes(x.bandwidth_limit)}/s` : 'unlimited') },
        { key: 'auth', label: 'Authentication' },
        { key: 'storage', label: 'Storage', value: (x) => x.storage || null, render: (x) => x.storage || '(the hosts\' replica folder)' },
        { key: 'machines', label: 'Machines on', value: (x) => Object.entries(x.machines).map(([m, host]) => `${m}: ${host || 'not placed'}`).join(', ') || null },
        { key: 'x', label: '', value: () => null, render: (x) => admin && h('button', { type: 'button', class: 'secondary', 'data-action': 'remove-extended',
          onclick: async () => {
            const gone = await confirmAndCall(`Remove the extended leg of ${x.pair}`, `The replica hosts of pair ${x.pair} stop forwarding to cloud ${x.cloud}; the third site keeps what it holds.`,
              `/v1/pairs/${encodeURIComponent(x.pair)}/extended`, { method: 'DELETE', label: 'Remove' });
            if (gone) await draw();
          } }, 'Remove') },
      ], legs.filter(Boolean), { id: 'extended-legs', empty: 'No pair has an extended leg.' }),
      admin && pairs.length > 0 && apiForm({ id: 'extended-form', title: 'Extend a pair to a third site', submitLabel: 'Add extended leg', fields: [
        { name: 'pair', label: 'Pair', type: 'select', options: names(pairs) },
        { name: 'cloud', label: 'Third cloud', type: 'select', options: names(clouds) },
        { name: 'frequency', label: 'Frequency', value: '5m', hint: '5m or 15m' },
        { name: 'additional_points', label: 'Additional points', type: 'number', value: 0, hint: '0-24 hourly' },
        { name: 'compression', label: 'Compression', type: 'checkbox', value: true },
        { name: 'bandwidth_limit', label: 'Bandwidth limit', hint: '100M, or empty' },
        { name: 'auth', label: 'Authentication', type: 'select', options: ['certificate', 'kerberos'] },
        { name: 'storage', label: 'Storage root', hint: 'empty: the hosts\' replica folder' }],
        onSubmit: async ({ pair, ...body }) => {
          await api(`/v1/pairs/${encodeURIComponent(pair)}/extended`, { method: 'POST', body });
          await done(`Pair ${pair} extended to cloud ${body.cloud}`);
        } }));

    const policySection = section('Protection policies',
      dataTable([
        { key: 'name', label: 'Policy' }, { key: 'target_kind', label: 'Target' },
        { key: 'frequency', label: 'Frequency', render: (p) => fmtDuration(p.frequency) },
        { key: 'additional_points', label: 'Extra points' },
        { key: 'app_consistent_hours', label: 'App-consistent every', render: (p) => (p.app_consistent_hours ? `${p.app_consistent_hours} h` : 'never') },
        { key: 'compression', label: 'Compression', render: (p) => yesNo(p.compression) },
        { key: 'auth', label: 'Authentication' },
        { key: 'bandwidth_limit', label: 'Bandwidth', render: (p) => (p.bandwidth_limit ? `${fmtBytes(p.bandwidth_limit)}/s` : 'unlimited') },
        { key: 'initial_method', label: 'Initial copy' },
        { key: 'resync', label: 'Resync', value: (p) => p.resync + (p.resync_window ? ` ${p.resync_window}` : '') },
        { key: 'rpo_threshold', label: 'RPO threshold', render: (p) => fmtDuration(p.rpo_threshold) },
        { key: 'copy_rate_when_busy', label: 'Copy while guest writes', render: (p) => (p.copy_rate_when_busy ? `${fmtBytes(p.copy_rate_when_busy)}/s` : 'full speed') },
        { key: 'pairs', label: 'Pairs', value: (p) => p.pairs.join(', ') || null },
        { key: 'x', label: '', value: () => null, render: (p) => del(`policy ${p.name}`, `/v1/policies/${encodeURIComponent(p.name)}`) },
      ], policies, { id: 'policies', empty: 'No policies yet.' }),
      admin && apiForm({ id: 'policy-form', title: 'New policy', submitLabel: 'Create policy', fields: [
        { name: 'name', label: 'Name' },
        { name: 'target_kind', label: 'Target', type: 'select', options: ['peer', 'azure'] },
        { name: 'frequency', label: 'Frequency', value: '5m', hint: '30s, 5m or 15m' },
        { name: 'additional_points', label: 'Additional points', type: 'number', value: 0, hint: '0-24 hourly' },
        { name: 'app_consistent_hours', label: 'App-consistent (hours)', type: 'number', value: 0 },
        { name: 'compression', label: 'Compression', type: 'checkbox', value: true },
        { name: 'auth', label: 'Authentication', type: 'select', options: ['certificate', 'kerberos'] },
        { name: 'port', label: 'Port', type: 'number' },
        { name: 'initial_method', label: 'Initial copy', type: 'select', options: ['network', 'scheduled', 'offline', 'existing'] },
        { name: 'initial_at', label: 'Scheduled at', hint: 'scheduled: 22:00:00' },
        { name: 'initial_seed_dir', label: 'Seed folder', hint: 'offline' },
        { name: 'initial_path', label: 'Existing replica', hint: 'existing' },
        { name: 'bandwidth_limit', label: 'Bandwidth limit', hint: '100M, or empty' },
        { name: 'resync', label: 'Resync', type: 'select', options: ['auto', 'manual'] },
        { name: 'resync_window', label: 'Resync window', hint: 'HH:MM-HH:MM' },
        { name: 'rpo_threshold', label: 'RPO threshold', value: '1h', hint: 'Warning past it: 15m, 1h (30s-24h)' },
        { name: 'copy_rate_when_busy', label: 'Copy rate while the guest writes', value: '50M', hint: 'initial copy and resync: 50M, or none for full speed' },
        { name: 'delete_replica_on_remove', label: 'Delete replica on removal', type: 'checkbox' },
        { name: 'azure_storage_account', label: 'Azure storage account' },
        { name: 'azure_container', label: 'Azure container' },
        { name: 'azure_encrypt', label: 'Encrypt stored data (Azure)', type: 'checkbox' }],
        onSubmit: async (v) => {
          if (v.target_kind !== 'azure' && !v.azure_encrypt) delete v.azure_encrypt;
          await api('/v1/policies', { method: 'POST', body: v });
          await done(`Policy ${v.name} created`);
        } }));

    const mappingRows = (kind) => pairs.flatMap((p) => p[`${kind}_mappings`].map((x) => ({ ...x, pair: p.name })));
    const mappingSection = (kind, title, hint) => section(title,
      dataTable([
        { key: 'pair', label: 'Pair' }, { key: 'source', label: 'Source' }, { key: 'target', label: 'Target' },
        { key: 'x', label: '', value: () => null, render: (x) => del(`${kind} mapping ${x.source}`, `/v1/pairs/${encodeURIComponent(x.pair)}/${kind}-mappings/${x.id}`) },
      ], mappingRows(kind), { id: `${kind}-mappings`, empty: `No ${kind} mappings yet.` }),
      admin && pairs.length > 0 && apiForm({ id: `${kind}-mapping-form`, title: `New ${kind} mapping`, submitLabel: 'Add mapping', fields: [
        { name: 'pair', label: 'Pair', type: 'select', options: names(pairs) },
        { name: 'source', label: 'Source', hint }, { name: 'target', label: 'Target', hint }],
        onSubmit: async ({ pair, ...body }) => {
          await api(`/v1/pairs/${encodeURIComponent(pair)}/${kind}-mappings`, { method: 'POST', body });
          await done(`Mapping added to ${pair}`);
        } }));

    clear(view, h('h1', {}, 'Settings'), policySection, cloudSection, pairSection, extendedSection,
      mappingSection('network', 'Network mappings', 'a network name'),
      mappingSection('storage', 'Storage mappings', 'an absolute path'), await accessSections(draw));
  }
  await draw();
}

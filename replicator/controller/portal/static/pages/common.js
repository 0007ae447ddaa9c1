// What several pages derive the same way from the API's lists.

import { h } from '../lib.js';

export const HOST_STALE_SECONDS = 300;     // a host that has not reported for 5 minutes is shown red
export const CERT_WARN_DAYS = 14;
// the checkbox an unplanned failover offers (issue 14: needed while the primary holds a live lease)
export const FORCE = 'Force: the primary may still hold its lease (recorded in the audit log)';

/** The machine's RPO target: its policy's replication frequency (as replicatord's health uses), or null. */
export function rpoTarget(machine, policies) {
  const p = policies.find((x) => x.name === machine.policy);
  return p ? p.frequency : null;
}

export function machineLink(name) {
  return h('a', { href: `#/machines/${encodeURIComponent(name)}`, class: 'machine-link' }, name);
}

export function hostUp(host, now = Date.now()) {
  return !!host.last_seen && (now - new Date(host.last_seen).getTime()) / 1000 < HOST_STALE_SECONDS;
}

export function certDaysLeft(host, now = Date.now()) {
  return host.cert_not_after ? (new Date(host.cert_not_after).getTime() - now) / 86400000 : null;
}

/** Configuration problems an operator should fix, one sentence each. */
export function problemsOf({ machines, hosts, pairs }) {
  const out = [];
  for (const p of pairs) {
    if (!p.policy) out.push(`Cloud pair ${p.name} has no protection policy.`);
    if (!p.primary || !p.recovery) out.push(`Cloud pair ${p.name} lacks its ${p.primary ? 'recovery' : 'primary'} cloud.`);
  }
  for (const x of hosts) {
    if (!hostUp(x)) out.push(`Host ${x.hostname} has not reported ${x.last_seen ? 'for over 5 minutes' : 'yet'}.`);
    if (x.applied_revision < x.desired_revision) out.push(`Host ${x.hostname} runs configuration revision ${x.applied_revision} of ${x.desired_revision}.`);
    const days = certDaysLeft(x);
    if (days !== null && days < CERT_WARN_DAYS) out.push(`Host ${x.hostname}'s certificate ${days < 0 ? 'has expired' : `expires in ${Math.floor(days)} days`}.`);
  }
  for (const x of machines) {
    if (x.desired_state !== 'disabled' && !x.replica_host) out.push(`Machine ${x.name} has no replica host.`);
    if (x.desired_state !== 'disabled' && !x.primary_host) out.push(`Machine ${x.name} has no primary host.`);
  }
  return out;
}

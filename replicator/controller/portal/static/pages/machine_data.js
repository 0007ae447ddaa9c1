// Facts about one machine that pages derive from the job list (the API keeps them as jobs).

const TEST_KINDS = new Set(['test_failover', 'test-failover']);

function isTestFailover(job) {
  return TEST_KINDS.has(job.kind) || (job.kind === 'failover' && job.params && job.params.kind === 'test');
}

/** The machine's newest succeeded test failover job, or null. */
export function lastTestFailover(name, jobs) {
  let best = null;
  for (const j of jobs) {
    if (j.machine === name && j.state === 'succeeded' && isTestFailover(j) && j.finished_at
        && (!best || j.finished_at > best.finished_at)) best = j;
  }
  return best;
}

/** The primary host's statistics for the machine, from GET /v1/observed/machines (or {}). */
export function reportedStats(observed) {
  const stats = observed?.primary?.entry?.stats;
  return stats && typeof stats === 'object' ? stats : {};
}

/** Reasons behind a health that is not Normal, with numbers blanked so that equal causes group together. */
export function causeOf(reason) {
  return String(reason).replace(/\d+(\.\d+)?/g, '#');
}

// A Node backend publishing with herald-client/publisher: typed helpers per
// event kind over `POST /v1/events`, calls within `batchWindowMs` sent as one
// batch, 503s, 504s and network errors retried with backoff (never a 4xx),
// each event under its own idempotency key (so a retry is delivered once),
// and a refusal as a HeraldPublishError that names the invalid field.
//
//   HERALD_URL=http://localhost:3000 HERALD_PUBLISH_TOKEN=… node publisher.mjs
//
// The events go to `demo-campaign`, the campaign of a zero-config herald.
// Exits non-zero when herald does not answer as the contract says.

import { createHeraldPublisher, HeraldPublishError } from "herald-client/publisher";

const publisher = createHeraldPublisher({
  url: process.env.HERALD_URL ?? "http://localhost:3000",
  token: process.env.HERALD_PUBLISH_TOKEN ?? "",
  batchWindowMs: 10, // calls within 10 ms go as one POST of an array
  retries: 5,
});
const ids = { campaignId: "demo-campaign", settlementId: "demo-settlement" };

// Two calls in the same window: one request, in order, all or nothing.
const [settlement, structure] = await Promise.all([
  publisher.settlementUpdated(
    { ...ids, operation: "update", changes: { name: "Harbor Town" } },
    { userId: "demo-user", source: "publisher.mjs", correlationId: "req-1" }, // metadata, optional
  ),
  publisher.structureUpdated({ ...ids, structureId: "demo-structure", operation: "create" }),
]);
console.log(`published 2 events in one batch: accepted ${settlement.accepted}`);
if (settlement.accepted !== 2 || structure.accepted !== 2) throw new Error("expected one batch of 2");

// herald checks ids against ^[A-Za-z0-9_-]{1,128}$: a refusal names the field.
try {
  await publisher.publish({ type: "settlement_updated", payload: { ...ids, settlementId: "not an id", operation: "update" } });
  throw new Error("herald accepted an invalid settlementId");
} catch (err) {
  if (!(err instanceof HeraldPublishError) || err.status !== 400) throw err;
  console.log(`refused: ${err.status} at ${err.path} (${err.serverError})`);
  if (err.path !== "payload.settlementId") throw new Error(`unexpected path ${err.path}`);
}

await publisher.close(); // flushes what is pending

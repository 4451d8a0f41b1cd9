// Drives a running dembrane-webhooks service through the generated TypeScript client, from
// the directory's facts to a webhook's delivery at a local receiver.
//
// `make test-clients` starts the service and sets E2E_GRPC_TARGET (host:port of its gRPC
// server) and E2E_JWT_SECRET (its WEBHOOKS_JWT_SECRET); without them the test is skipped.
// The service must let loopback targets through (WEBHOOKS_ALLOWED_TARGETS=127.0.0.0/8).
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { createServer, type IncomingHttpHeaders } from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import { SignJWT } from "jose";

import { errorDetails } from "dembrane-webhooks-client/errors";
import { DirectoryServiceClient } from "dembrane-webhooks-client/v1/directory_service";
import { Event } from "dembrane-webhooks-client/v1/event";
import { EventServiceClient, type PublishEventResponse } from "dembrane-webhooks-client/v1/event_service";
import { DeliveryStatus } from "dembrane-webhooks-client/v1/webhook";
import {
  CreateWebhookRequest,
  type CreateWebhookResponse,
  ListDeliveriesRequest,
  type ListDeliveriesResponse,
  WebhookServiceClient,
} from "dembrane-webhooks-client/v1/webhook_service";

const EVENT_TYPE = "conversation.summarized";

interface Received {
  method: string | undefined;
  url: string | undefined;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

/** Signs an HS256 token for `subject`, with the given space-separated scopes. */
async function mintToken(secret: string, subject: string, scope?: string): Promise<string> {
  return new SignJWT(scope ? { scope } : {})
    .setProtectedHeader({ alg: "HS256" })
    .setSubject(subject)
    .setIssuedAt()
    .setExpirationTime("10m")
    .sign(new TextEncoder().encode(secret));
}

/** Metadata that carries the bearer token. */
function bearer(token: string): Metadata {
  const metadata = new Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

/** Turns one callback-style unary call into a promise. */
function call<T>(
  start: (done: (error: ServiceError | null, response: T) => void) => unknown,
): Promise<T> {
  return new Promise((resolve, reject) => {
    start((error, response) => (error ? reject(error) : resolve(response)));
  });
}

const target = process.env.E2E_GRPC_TARGET ?? "";
const secret = process.env.E2E_JWT_SECRET ?? "";
const skip = !target || !secret ? "E2E_GRPC_TARGET and E2E_JWT_SECRET name no running service" : false;

test(
  "a published event reaches the receiver",
  { skip, timeout: 90_000 },
  async (t) => {
    const hits: Received[] = [];
    const receiver = createServer((request, response) => {
      const chunks: Buffer[] = [];
      request.on("data", (chunk: Buffer) => chunks.push(chunk));
      request.on("end", () => {
        const { method, url, headers } = request;
        hits.push({ method, url, headers, body: Buffer.concat(chunks) });
        response.writeHead(204).end();
      });
    });
    await new Promise<void>((resolve) => receiver.listen(0, "127.0.0.1", resolve));
    t.after(() => receiver.close());
    const { port } = receiver.address() as AddressInfo;

    const channel = credentials.createInsecure();
    const directory = new DirectoryServiceClient(target, channel);
    const webhooks = new WebhookServiceClient(target, channel);
    const events = new EventServiceClient(target, channel);
    t.after(() => [directory, webhooks, events].forEach((client) => client.close()));

    // Fresh names on every run, so the test can run again against the same service.
    const suffix = randomBytes(5).toString("hex");
    const workspaceId = `ts-ws-${suffix}`;
    const projectId = `ts-p-${suffix}`;
    const adminId = `ts-admin-${suffix}`;
    const eventId = `ts-evt-${suffix}`;
    const backendToken = await mintToken(secret, "ts-backend", "webhooks:directory webhooks:publish");
    const backend = bearer(backendToken);
    const admin = bearer(await mintToken(secret, adminId));

    await call((done) =>
      directory.upsertWorkspace(
        { workspaceId, name: "TypeScript client workspace", tier: "changemaker" },
        backend,
        done,
      ),
    );
    await call((done) =>
      directory.upsertProject(
        { projectId, workspaceId, name: "TypeScript client project", language: "en" },
        backend,
        done,
      ),
    );
    await call((done) =>
      directory.setMembership({ workspaceId, userId: adminId, role: "admin" }, backend, done),
    );

    const created = await call<CreateWebhookResponse>((done) =>
      webhooks.createWebhook(
        CreateWebhookRequest.fromPartial({
          projectId,
          name: "TypeScript client receiver",
          url: `http://127.0.0.1:${port}/hooks/dembrane`,
          events: [EVENT_TYPE],
        }),
        admin,
        done,
      ),
    );
    const webhookId = created.webhook?.id ?? "";
    assert.ok(webhookId, "CreateWebhook answered no webhook id");
    assert.ok(created.secret, "CreateWebhook answered no secret");

    const published = await call<PublishEventResponse>((done) =>
      events.publishEvent(
        {
          event: Event.fromPartial({
            id: eventId,
            type: EVENT_TYPE,
            projectId,
            occurTime: new Date(),
            conversation: {
              id: `conv-${suffix}`,
              participantName: "Sam",
              isFinished: true,
              summary: "Sam asked for more benches in the park.",
            },
          }),
        },
        backend,
        done,
      ),
    );
    assert.equal(published.result?.eventId, eventId);
    assert.equal(published.result?.deliveryCount, 1);

    const deadline = Date.now() + 60_000;
    while (hits.length === 0) {
      assert.ok(Date.now() < deadline, "the receiver got no request");
      await sleep(50);
    }
    const [hit] = hits;
    assert.equal(hit.method, "POST");
    assert.equal(hit.url, "/hooks/dembrane");
    assert.equal(hit.headers["webhook-id"], eventId);
    assert.equal(hit.headers["x-dembrane-event"], EVENT_TYPE);
    const signature = createHmac("sha256", created.secret).update(hit.body).digest("hex");
    assert.equal(hit.headers["x-dembrane-signature"], `sha256=${signature}`);
    const body = JSON.parse(hit.body.toString("utf8")) as {
      id: string;
      event: string;
      project: { id: string };
    };
    assert.equal(body.id, eventId);
    assert.equal(body.event, EVENT_TYPE);
    assert.equal(body.project.id, projectId);

    // The outcome is stored just after the receiver answers: wait for it.
    for (;;) {
      const listed = await call<ListDeliveriesResponse>((done) =>
        webhooks.listDeliveries(ListDeliveriesRequest.fromPartial({ projectId, webhookId }), admin, done),
      );
      assert.equal(listed.deliveries.length, 1);
      const [delivery] = listed.deliveries;
      assert.equal(delivery.eventId, eventId);
      if (delivery.status === DeliveryStatus.DELIVERY_STATUS_SUCCEEDED) {
        break;
      }
      assert.ok(Date.now() < deadline, `the delivery is still ${DeliveryStatus[delivery.status]}`);
      await sleep(100);
    }
  },
);

test(
  "a refused call's reason and field violations can be read",
  { skip, timeout: 30_000 },
  async (t) => {
    const directory = new DirectoryServiceClient(target, credentials.createInsecure());
    const webhooks = new WebhookServiceClient(target, credentials.createInsecure());
    t.after(() => [directory, webhooks].forEach((client) => client.close()));
    const suffix = randomBytes(5).toString("hex");
    const workspaceId = `ts-ws-${suffix}`;
    const projectId = `ts-p-${suffix}`;
    const adminId = `ts-admin-${suffix}`;
    const backend = bearer(await mintToken(secret, "ts-backend", "webhooks:directory"));
    await call((done) =>
      directory.upsertWorkspace({ workspaceId, name: "Errors", tier: "changemaker" }, backend, done),
    );
    await call((done) =>
      directory.upsertProject({ projectId, workspaceId, name: "Errors", language: "en" }, backend, done),
    );
    await call((done) =>
      directory.setMembership({ workspaceId, userId: adminId, role: "admin" }, backend, done),
    );

    const admin = bearer(await mintToken(secret, adminId));
    const error = await call((done) =>
      webhooks.createWebhook(
        CreateWebhookRequest.fromPartial({ projectId, name: "Bad", url: "nope", events: [EVENT_TYPE] }),
        admin,
        done,
      ),
    ).then(
      () => assert.fail("CreateWebhook took an invalid URL"),
      (refused: ServiceError) => refused,
    );
    const details = errorDetails(error);
    assert.ok(details, "the error carries no google.rpc.Status");
    assert.equal(details.code, 3); // INVALID_ARGUMENT
    assert.equal(details.code, error.code);
    assert.equal(details.errorInfo?.domain, "webhooks.dembrane.com");
    assert.equal(details.errorInfo?.reason, "INVALID_ARGUMENT");
    assert.deepEqual(
      details.fieldViolations.map((violation) => violation.field),
      ["url"],
    );
  },
);
